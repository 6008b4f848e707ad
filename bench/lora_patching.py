"""What a LoRA stack costs: applying and removing it against one sampler step, and peak memory.

    .venv/bin/python bench/lora_patching.py [--px 256] [--rank 32] [--rounds 3]

On the full-size SD1.5 UNet (random weights: none can be downloaded here), two
LoRA stacks of the kohya kind (rank ``--rank`` on every attention projection,
feed-forward and transformer in/out projection) are built. Reported side by side:

* the median time to apply and remove each stack (``nodes.runtime.patches.patched``
  entering and leaving), against the median time of one sampler step (one UNet
  call of batch 2, as classifier-free guidance runs it) at ``--px``;
* the process's peak resident memory after alternating jobs with the two stacks
  (A B A B), against the UNet's own size: patching saves only the patched weights
  for the length of a job, so the peak must stay far below a second UNet.

A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_stack(unet, rank: int, seed: int, name: str):
    import torch

    from nodes.runtime.patches import LoraEntry, LowRank

    gen = torch.Generator().manual_seed(seed)
    table = {}
    for pname, p in unet.named_parameters():
        if p.ndim == 2 and any(s in pname for s in ("attn1.", "attn2.", "ff.net", "proj_in", "proj_out")):
            out_f, in_f = p.shape
            table[pname] = LowRank(torch.randn(out_f, rank, generator=gen) * 0.01,
                                   torch.randn(rank, in_f, generator=gen) * 0.01, 1.0)
    return (LoraEntry(name, 0.8, {"unet": table}),), len(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from img2img_vs_diffusers import full_size_components
    from nodes.runtime.patches import patched

    torch.set_grad_enabled(False)
    unet = full_size_components()["unet"]
    unet_mib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    stacks = [make_stack(unet, args.rank, seed, name) for seed, name in ((1, "A"), (2, "B"))]
    base_rss = rss_mib()
    side = args.px // 8
    x = torch.randn(2, 4, side, side)
    context = torch.randn(2, 77, 768)
    t = torch.tensor(500.0)

    unet(x, t, encoder_hidden_states=context)  # warm-up
    step_times, patch_times = [], {s[0][0].name: [] for s in stacks}
    before = {k: v.clone() for k, v in list(unet.state_dict().items())[:50]}
    for _ in range(args.rounds):
        for stack, _count in stacks:  # alternating jobs: A B A B
            start = time.perf_counter()
            with patched(unet, stack, "unet"):
                applied = time.perf_counter()
                t0 = time.perf_counter()
                unet(x, t, encoder_hidden_states=context)
                step_times.append(time.perf_counter() - t0)
                removing = time.perf_counter()
            patch_times[stack[0].name].append((applied - start) + (time.perf_counter() - removing))
    exact = all(torch.equal(before[k], v) for k, v in list(unet.state_dict().items())[:50])

    step = statistics.median(step_times)
    print(f"full-size SD1.5 UNet ({unet_mib:.0f} MiB fp32), {args.px} px, batch 2, rank {args.rank}, "
          f"{args.rounds} rounds of A B")
    for (stack, count), name in zip(stacks, patch_times):
        apply_remove = statistics.median(patch_times[name])
        print(f"  stack {name}: {count} modules patched; apply + remove {apply_remove:.3f} s "
              f"= {apply_remove / step:.2f} of one sampler step ({step:.3f} s)")
    print(f"  base weights bit-identical after the jobs: {exact}")
    print(f"  resident memory: {base_rss:.0f} MiB before the jobs, peak {peak_mib():.0f} MiB; "
          f"a second UNet copy would add {unet_mib:.0f} MiB")


if __name__ == "__main__":
    main()
