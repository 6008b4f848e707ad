"""Peak memory and time per step of a FLUX-shaped transformer, its linear weights held in the compute
dtype, in fp8 or in bf16 (``--storage all``; bf16 is how a CPU holds ComfyUI's bf16 flux1-dev file).

    # this machine (CPU): full width, reduced depth and resolution, fp32 compute
    PYTHONPATH=. python bench/flux_memory.py
    # a lent GPU: the full 12 B transformer (19 double + 38 single blocks) with random weights,
    # bf16 and fp8 (float8_e4m3fn storage, bf16 compute one layer at a time) at 1024x1024
    PYTHONPATH=. python bench/flux_memory.py --full-size --device cuda
    # block-by-block offloading (nodes.runtime.offload) against the model held whole: on the CPU
    # the blocks rest on disk, on CUDA in CPU memory; add --storage compute to halve the runs
    PYTHONPATH=. python bench/flux_memory.py --offload both --double 4 --single 8
    PYTHONPATH=. python bench/flux_memory.py --offload both --full-size --device cuda

The model is built on the meta device (no memory), then materialised directly on
the target device in the storage dtype and filled with random numbers, so the
full size never passes through host memory. Each variant runs in its own
process (clean peak counters). Needs torch and diffusers only (no Kiln venv):
Kiln's own pieces used are nodes.families.flux (patching, ids, the network
wrapper the sampler calls) and nodes.runtime.fp8 (fp8 storage, cast per layer).
Reports one JSON line per variant: weights in bytes, peak memory, seconds per step
(mean of the timed steps after one warm-up step). With ``--offload`` the model is built on
the CPU and placed by Kiln's ``offload_blocks`` exactly as the model manager does;
``steps_peak_gb`` is then the peak while sampling only (the process's RSS high-water mark
reset through /proc/self/clear_refs after placing, or CUDA's peak counter reset), since
building the model holds it whole once in either case.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RELEASED = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _build(config: dict, device: str, storage: str, compute):
    import torch
    from diffusers import FluxTransformer2DModel

    from nodes.runtime.fp8 import cast_linear_class

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype=compute)
    gen = torch.Generator(device=device).manual_seed(0)
    cast = cast_linear_class()
    with torch.no_grad():
        # one module at a time, so an fp8 model never exists in full at the compute dtype
        for module in model.modules():
            module.to_empty(device=device, recurse=False)
            for name, p in list(module.named_parameters(recurse=False)):
                if p.ndim >= 2:
                    p.normal_(0.0, 0.02, generator=gen)
                else:
                    p.fill_(1.0 if "norm" in name else 0.0)
            for b in module.buffers(recurse=False):
                if b.is_floating_point():
                    b.zero_()
            held = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}.get(storage)
            if held is not None and held != compute and isinstance(module, torch.nn.Linear):
                # as the loader holds a fp8 or bf16 file's linear weights (nodes.runtime.fp8.held_dtype)
                module.weight = torch.nn.Parameter(module.weight.to(held), requires_grad=False)
                module.__class__ = cast
    return model.eval().requires_grad_(False)


def _rss(field: str) -> int | None:
    """A /proc/self/status figure in bytes (VmRSS now, VmHWM the high-water mark); None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak(device: str) -> None:
    """Start the peak counters afresh: building the model is not what is measured."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def run_variant(args) -> dict:
    import torch

    from nodes.families.flux import FluxNetwork

    device = args.device
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    config = dict(RELEASED)
    if not args.full_size:
        config.update(num_layers=args.double, num_single_layers=args.single)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = _build(config, "cpu" if args.offload == "blocks" else device, args.storage, compute)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rest = None
    if args.offload == "blocks":
        from nodes.runtime.offload import offload_blocks

        rest = "cpu" if device != "cpu" else "disk"
        offload_blocks(model, device, rest, "bench", args.offload_folder)
    build_s = time.perf_counter() - t0
    _reset_peak(device)
    placed_rss = _rss("VmRSS")
    net = FluxNetwork(model)
    h = w = args.size // 8
    x = torch.randn(1, 16, h, w, device=device, dtype=compute)
    text = torch.randn(1, args.tokens, config["joint_attention_dim"], device=device, dtype=compute)
    kwargs = {"pooled_projections": torch.randn(1, config["pooled_projection_dim"], device=device, dtype=compute),
              "guidance": torch.full((1,), 3.5, device=device)}
    times = []
    with torch.inference_mode():
        for i in range(args.steps + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = net(x, torch.tensor([1000.0 * (1 - i / (args.steps + 1))]), text, **kwargs)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up kernels and allocators
                times.append(time.perf_counter() - start)
            x = x - 0.05 * out
    if device == "cuda":
        peak = steps_peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        steps_peak = _rss("VmHWM")
    return {"storage": args.storage, "offload": rest or "none", "compute": str(compute).replace("torch.", ""),
            "device": device, "steps_peak_gb": round(steps_peak / 1e9, 2) if steps_peak else None,
            "rss_after_placing_gb": round(placed_rss / 1e9, 2) if placed_rss else None,
            "load_1min": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(),
            "double_blocks": config["num_layers"], "single_blocks": config["num_single_layers"],
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "weights_gb": round(weights / 1e9, 2), "peak_gb": round(peak / 1e9, 2),
            "peak_kind": "cuda max_memory_allocated" if device == "cuda" else "process max RSS",
            "size": args.size, "text_tokens": args.tokens, "build_s": round(build_s, 1),
            "s_per_step": round(sum(times) / len(times), 3), "finite": bool(torch.isfinite(x).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="the released 19 + 38 blocks")
    parser.add_argument("--double", type=int, default=1, help="double blocks when not --full-size")
    parser.add_argument("--single", type=int, default=1, help="single blocks when not --full-size")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024 on cuda, 256 on cpu)")
    parser.add_argument("--tokens", type=int, default=512, help="T5 tokens")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on cuda, 2 on cpu)")
    parser.add_argument("--storage", choices=["compute", "fp8", "bf16", "both", "all"], default="both",
                        help="linear weights held in the compute dtype, fp8 or bf16 (a bf16 file on a CPU), "
                             "cast per call; both: compute and fp8; all: the three")
    parser.add_argument("--offload", choices=["none", "blocks", "both"], default="none",
                        help="blocks: Kiln's block-by-block offloading (disk on the CPU, CPU memory on CUDA)")
    parser.add_argument("--offload-folder", default=None, help="where disk-offloaded blocks go (system temp)")
    args = parser.parse_args()
    args.size = args.size or (1024 if args.device == "cuda" else 256)
    args.steps = args.steps or (5 if args.device == "cuda" else 2)
    if args.storage not in ("both", "all") and args.offload != "both":
        print(json.dumps(run_variant(args)), flush=True)
        return
    argv, skip = [], False
    for a in sys.argv[1:]:  # everything but --storage, --offload and their values
        if skip or a.startswith(("--storage", "--offload=")) or a == "--offload":
            skip = a in ("--storage", "--offload")
            continue
        argv.append(a)
    storages = {"both": ("compute", "fp8"), "all": ("compute", "bf16", "fp8")}.get(args.storage, (args.storage,))
    offloads = ("none", "blocks") if args.offload == "both" else (args.offload,)
    for storage in storages:  # one process each: clean peaks
        for offload in offloads:
            subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--storage", storage,
                            "--offload", offload], check=True)


if __name__ == "__main__":
    main()
