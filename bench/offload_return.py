"""What a denoiser gains by going back whole once it fits again (ModelManager._fit_denoiser).

    PYTHONPATH=. python bench/offload_return.py                  # 4 double + 8 single blocks, width 1024
    PYTHONPATH=. python bench/offload_return.py --double 2 --single 4 --heads 24   # full width, fewer blocks

A FLUX-shaped transformer (random weights, fp32, on the CPU) is handed to a ModelManager whose RAM
budget is too small, so its first use pages it to disk block by block; timed forwards follow. The
budget is then raised: the next use brings it back whole (timed: reading every block file back,
removing the hooks, deleting the folder), and the same forwards are timed again. Reports one JSON
line: weights, seconds per forward paged and whole (median of the timed runs after one warm-up),
their ratio, and the switch's seconds. Block files sit in the page cache here (just written), so
this is the paged path's best case; a cold disk only widens the gap.
"""
from __future__ import annotations

import argparse
import json
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


def _timed(manager, key, loader, runs: int, tokens: int, text: int, width: int) -> tuple[float, object]:
    times, out = [], None
    with manager.use(key, "unet", loader) as net:
        for i in range(runs + 1):
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
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import torch
    from diffusers import FluxTransformer2DModel

    from nodes.runtime import offload
    from nodes.runtime.models import ModelManager, _module_bytes

    torch.manual_seed(0)
    width = args.heads * 128
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                                 attention_head_dim=128, num_attention_heads=args.heads, joint_attention_dim=width,
                                 pooled_projection_dim=width, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    size = _module_bytes(net)
    manager = ModelManager(device="cpu", cpu_budget_bytes=size // 2)
    key = ("bench", "offload-return")

    def loader(_):
        return {"unet": net}

    paged, out_paged = _timed(manager, key, loader, args.runs, args.tokens, 64, width)
    folder = offload.offloaded(net).folder
    manager.cpu_budget_bytes = size * 4
    start = time.perf_counter()
    with manager.use(key, "unet", loader):
        switch = time.perf_counter() - start
    whole, out_whole = _timed(manager, key, loader, args.runs, args.tokens, 64, width)
    print(json.dumps({"weights_gb": round(size / 1e9, 3), "blocks": args.double + args.single,
                      "paged_s_per_forward": round(paged, 3), "whole_s_per_forward": round(whole, 3),
                      "paged_over_whole": round(paged / whole, 2), "switch_s": round(switch, 3),
                      "made_whole": manager.counters["made_whole"], "folder_left": Path(folder).exists(),
                      "max_abs_diff": float((out_paged - out_whole).abs().max())}))


if __name__ == "__main__":
    main()
