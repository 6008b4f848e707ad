"""What a denoiser gains by going back whole once it fits again (ModelManager._fit_denoiser).

    PYTHONPATH=. python bench/offload_return.py                  # 4 double + 8 single blocks, width 1024
    PYTHONPATH=. python bench/offload_return.py --cold           # block files evicted from the page cache
    PYTHONPATH=. python bench/offload_return.py --double 2 --single 4 --heads 24   # full width, fewer blocks

A FLUX-shaped transformer (random weights, fp32, on the CPU) is handed to a ModelManager whose RAM
budget is too small, so its first use pages it to disk block by block; timed forwards follow. The
budget is then raised: the next use brings it back whole (timed: reading every block file back,
removing the hooks, deleting the folder), and the same forwards are timed again; then lowered again
(timed: writing the block files), for ``--rounds`` interleaved rounds. Reports one JSON line:
weights, seconds per forward paged and whole per round (median of the timed runs after one
warm-up), the median ratio, and the switches' seconds. Without ``--cold`` the block files sit in the page cache (just
written): the paged path's best case, where diffusers' memory-mapped reads cost little on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def _forward(net, tokens: int, text: int, width: int):
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return net(hidden_states=torch.randn(1, tokens, 64, generator=g),
                   encoder_hidden_states=torch.randn(1, text, width, generator=g),
                   pooled_projections=torch.randn(1, width, generator=g), timestep=torch.tensor([0.5]),
                   img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]),
                   return_dict=False)[0]


def _drop_cached(folder: str | None) -> None:
    """Evict the block files from the page cache (only these files: the kernel does the same under the
    memory pressure that paged the model), so the next forward reads them from the disk."""
    if folder is None:
        return
    for path in Path(folder).iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(manager, key, loader, runs: int, tokens: int, text: int, width: int,
           cold: bool = False) -> tuple[float, object]:
    from nodes.runtime import offload

    times, out = [], None
    with manager.use(key, "unet", loader) as net:
        for i in range(runs + 1):
            if cold:
                _drop_cached(getattr(offload.offloaded(net), "folder", None))
            start = time.perf_counter()
            out = _forward(net, tokens, text, width)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8, help="attention heads of width 128 (24: FLUX's 3072)")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (256: a 256x256 image)")
    parser.add_argument("--runs", type=int, default=2, help="timed forwards per placement and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the block files from the page cache before "
                        "each paged forward (as memory pressure would)")
    args = parser.parse_args()

    import torch
    from diffusers import FluxTransformer2DModel

    from nodes.runtime import offload
    from nodes.runtime.measure import module_bytes
    from nodes.runtime.models import ModelManager

    torch.manual_seed(0)
    width = args.heads * 128
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                                 attention_head_dim=128, num_attention_heads=args.heads, joint_attention_dim=width,
                                 pooled_projection_dim=width, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    size = module_bytes(net)
    manager = ModelManager(device="cpu", cpu_budget_bytes=size // 2)
    key = ("bench", "offload-return")

    def loader(_):
        return {"unet": net}

    # interleaved rounds (paged, then whole), so a shared host's changing load hits both alike
    paged, whole, to_whole, to_paged, diffs, folders = [], [], [], [], [], []
    for _ in range(args.rounds):
        manager.cpu_budget_bytes = size // 2
        start = time.perf_counter()
        with manager.use(key, "unet", loader):
            to_paged.append(time.perf_counter() - start)  # the first round includes nothing else either
        folders.append(offload.offloaded(net).folder)
        t, out_paged = _timed(manager, key, loader, args.runs, args.tokens, 64, width, cold=args.cold)
        paged.append(t)
        manager.cpu_budget_bytes = size * 4
        start = time.perf_counter()
        with manager.use(key, "unet", loader):
            to_whole.append(time.perf_counter() - start)
        t, out_whole = _timed(manager, key, loader, args.runs, args.tokens, 64, width)
        whole.append(t)
        diffs.append(float((out_paged - out_whole).abs().max()))
    med = statistics.median
    print(json.dumps({"cold": args.cold, "weights_gb": round(size / 1e9, 3), "blocks": args.double + args.single, "rounds": args.rounds,
                      "paged_s_per_forward": [round(t, 3) for t in paged],
                      "whole_s_per_forward": [round(t, 3) for t in whole],
                      "paged_over_whole_median": round(med(p / w for p, w in zip(paged, whole)), 2),
                      "to_paged_s_median": round(med(to_paged), 3), "to_whole_s_median": round(med(to_whole), 3),
                      "made_whole": manager.counters["made_whole"],
                      "folders_left": sum(Path(f).exists() for f in folders), "max_abs_diff": max(diffs)}))


if __name__ == "__main__":
    main()
