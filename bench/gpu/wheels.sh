#!/usr/bin/env bash
# Here (with pip and the package registries): the pure-Python wheels a lent GPU machine lacks, at
# the versions requirements.txt pins, into .whl/ (ignored by git; carried by the device call).
# That machine's image has CUDA torch, transformers, accelerate, safetensors, numpy, networkx,
# pillow, aiohttp, msgpack, peft and einops but no diffusers or torchsde, and an older
# transformers than ours (5.17 against 5.23), so those travel. Python there is 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
pin() { grep -E "^$1==" requirements.txt | head -1; }
wanted=("$(pin diffusers)" "$(pin transformers)" "$(pin torchsde)" trampoline==0.1.2 importlib_metadata==10.2.0)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wanted[@]}"
# one version of each: an older download beside a newer pin stops the whole install there
for w in .whl/*.whl; do
  name=$(basename "$w" | cut -d- -f1); version=$(basename "$w" | cut -d- -f2)
  for want in "${wanted[@]}"; do
    [[ "${want%%==*}" == "$name" && "${want##*==}" != "$version" ]] && rm -v "$w"
  done
done
ls -la .whl
