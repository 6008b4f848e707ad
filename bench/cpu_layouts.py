"""Does the CPU denoiser gain from channels-last memory or from frozen, pre-packed weights?

    .venv/bin/python bench/cpu_layouts.py [--px 256] [--rounds 5]

Issue 16 asks for "frozen, pre-packed weights and channels-last layout where it
pays" on the CPU. This measures whether it pays, on the full-size SD1.5 UNet with
random weights, one batch-2 call (cond and uncond, as one CFG step) at --px:

* eager, the way Kiln runs today;
* channels-last: a copy of the UNet and the input in ``torch.channels_last``;
* frozen: (another copy, about 3.4 GB each) ``torch.jit.trace`` + ``torch.jit.freeze`` + ``optimize_for_inference``
  (constant weights folded and pre-packed for oneDNN). Its set-up time is printed.

The three run interleaved (A B C, then C B A, ...), the load average is recorded
before each round, and rounds with more load than cores are marked ``*``. Each
variant's largest difference from eager is printed, so a fast but wrong variant is
visible. A benchmark, not a test: nothing is asserted. The last line is JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from img2img_vs_diffusers import full_size_unet  # noqa: E402

CORES = os.cpu_count() or 1


def variants(unet: Any, x: Any, t: Any, context: Any) -> tuple[dict[str, Callable[[], Any]], float]:
    """The three ways to call the UNet, and the seconds freezing took to set up."""
    import torch

    class Positional(torch.nn.Module):
        """TorchScript traces positional tensors only, and a tuple out."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any, t: Any, context: Any) -> Any:
            return self.inner(x, t, encoder_hidden_states=context, return_dict=False)[0]

    def eager() -> Any:
        return unet(x, t, encoder_hidden_states=context).sample

    last = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    x_last = x.to(memory_format=torch.channels_last)

    def channels_last() -> Any:
        return last(x_last, t, encoder_hidden_states=context).sample

    start = time.perf_counter()
    traced = torch.jit.trace(Positional(unet), (x, t, context), check_trace=False)
    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    frozen(x, t, context)  # TorchScript optimises on its first calls
    frozen(x, t, context)
    setup = time.perf_counter() - start
    return {"eager": eager, "channels_last": channels_last, "frozen": lambda: frozen(x, t, context)}, setup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch

    unet = full_size_unet()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, args.px // 8, args.px // 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    t = torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        calls, freeze_setup = variants(unet, x, t, context)
        reference = calls["eager"]()
        differences = {name: float((call() - reference).abs().max()) for name, call in calls.items()}
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        for round_index in range(args.rounds):
            load = os.getloadavg()[0]
            for name in order if round_index % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                calls[name]()
                seconds[name].append(time.perf_counter() - start)
            mark = "*" if load > CORES else " "
            print(f"round {round_index}{mark} load {load:.2f}: "
                  + "  ".join(f"{name} {seconds[name][-1]:.2f}s" for name in order), flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"full-size SD1.5 UNet, batch 2 at {args.px} px, {CORES} cores, median of {args.rounds}:")
    for name in order:
        print(f"  {name:14s} {medians[name]:6.2f} s  ratio to eager {medians[name] / medians['eager']:.3f}"
              f"  max difference {differences[name]:.1e}")
    print(f"  freezing set-up (trace, freeze, two warm calls): {freeze_setup:.1f} s")
    print(json.dumps({"px": args.px, "median_s": medians, "max_difference": differences,
                      "freeze_setup_s": freeze_setup}))


if __name__ == "__main__":
    main()
