#!/usr/bin/env bash
# There (a lent GPU machine, one `run` call): every check that needs CUDA, most valuable first,
# each under its own time limit and all under one deadline, so that one call of at most ten
# minutes returns whatever finished. Prepare here first with bench/gpu/wheels.sh; then call
#   device run  carry=[".whl"]  timeout_s=590  command="bash bench/gpu/checks.sh 570"
# Logs land in $OUT (at most 8 files come back): one per step, and summary.txt.
#
# 1. the CUDA-only tests (skipped on the CPU hosts: device placement, offload in memory mode,
#    text encoders leaving the GPU, in-place LoRA on a paged model, each family in its own dtype);
# 2. issue 16's GPU figures: full-size SD1.5 at 512 px in float16, Kiln eager and compiled
#    against diffusers' img2img pipeline, batch 1/2/4 in one job and 1/2/4 queued jobs, each
#    with its largest pixel difference from the single eager run;
# 3. issue 10's: the released 12 B FLUX transformer with random weights, bf16 and fp8 storage,
#    peak memory and seconds per step at 1024 px; then block offload against whole;
# 4. FluxKVCache's saving on FLUX.2 [klein] 4B at full depth, one 1024 px reference.
set -u
budget=${1:-570}
deadline=$(( $(date +%s) + budget ))
out=${OUT:-/tmp/kiln-gpu-checks}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
summary="$out/summary.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$summary"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{ date -u; nvidia-smi -L; python3 -c 'import sys, torch, diffusers, transformers; print(sys.version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'; } > "$summary" 2>&1

step() {  # step NAME LIMIT_S COMMAND...: runs it for at most LIMIT_S and what is left before the deadline
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) - 5 ))
  (( left < limit )) && limit=$left
  if (( limit < 30 )); then echo "== $name: skipped, ${left}s left" >> "$summary"; return; fi
  local start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - start ))s (limit ${limit}s)" >> "$summary"
  tail -n 25 "$out/$name.log" | grep -v "should be kept in float32" >> "$summary"
}

step cuda-tests 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_offload.py tests/test_runtime_models.py \
  tests/test_loaders.py tests/test_family_precision.py
step sd15-perf 260 python3 bench/perf_suite.py --device cuda --size full --px 512 --steps 20 --rounds 2 \
  --compile off,on --batches 1,2,4 --queued 1,2,4 --no-startup
step flux-full 120 python3 bench/flux_memory.py --full-size --device cuda
step flux-offload 120 python3 bench/flux_memory.py --full-size --device cuda --offload both --storage fp8
step flux2-kv 60 python3 bench/flux2_kv_cache.py --full-size --device cuda --size 1024 --rounds 3
cat "$summary"
