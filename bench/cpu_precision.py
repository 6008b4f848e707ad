"""Kiln on the CPU in float32 (``--precision auto``) against bfloat16 (``--precision bf16``), side by side.

    .venv/bin/python bench/cpu_precision.py [--px 256] [--steps 10] [--rounds 3]

The full-size SD1.5 shapes with random weights (bench/img2img_vs_diffusers.py's checkpoint, loaded
through Kiln's CheckpointLoader), txt2img with KSampler (euler, cfg 7.5, one batch-2 UNet call per
step) and VAEDecode, through two model managers that differ only in precision. Rounds alternate
fp32 bf16, bf16 fp32, ...; the load average is recorded before each and rounds with more load than
cores are marked ``*``. Printed: the CPU's native-bf16 flags, median seconds per image for each, the
ratio, and how far the bf16 image is from the float32 one. On CPUs without native bfloat16 (AVX2
only) the bf16 side is emulated and far slower: run with --steps 1 there. A benchmark, not a test:
nothing is asserted. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))  # node_call: a node run with a context, as the tests do

from img2img_vs_diffusers import NEGATIVE, PROMPT, saved_components  # noqa: E402

CORES = os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from engine.context import Environment, Paths
    from nodes import loaders, text, vae as vae_nodes
    from nodes.runtime.models import ModelManager
    from nodes.runtime.precision import NATIVE_BF16_FLAGS, cpu_has_native_bf16
    from nodes.sampling import ksampler
    from node_call import call

    work = Path(tempfile.mkdtemp(prefix="kiln-precision-"))
    saved_components("full", work)
    sides = {}
    for mode in ("fp32", "bf16"):
        env = Environment(paths=Paths.under(work / mode, models=work / "models"),
                          models=ModelManager(device="cpu", precision=mode))
        model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name="bench.safetensors")
        positive = call(text.clip_text_encode, env, text=PROMPT, clip=clip)[0]
        negative = call(text.clip_text_encode, env, text=NEGATIVE, clip=clip)[0]
        sides[mode] = (env, model, vae, positive, negative)

    def image(mode: str) -> torch.Tensor:
        env, model, vae, positive, negative = sides[mode]
        latent = {"samples": torch.zeros(1, 4, args.px // 8, args.px // 8)}
        (out,) = call(ksampler, env, model=model, seed=3, steps=args.steps, cfg=7.5, sampler_name="euler",
                      scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
        return call(vae_nodes.vae_decode, env, samples=out, vae=vae)[0]

    images = {mode: image(mode) for mode in sides}  # warm-up, and the images compared
    seconds: dict[str, list[float]] = {mode: [] for mode in sides}
    order = list(sides)
    for round_index in range(args.rounds):
        load = os.getloadavg()[0]
        for mode in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            image(mode)
            seconds[mode].append(time.perf_counter() - start)
        mark = "*" if load > CORES else " "
        print(f"round {round_index}{mark} load {load:.2f}: "
              + "  ".join(f"{mode} {seconds[mode][-1]:.1f}s" for mode in order), flush=True)
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    gap = float((images["bf16"] - images["fp32"]).abs().max())
    native = cpu_has_native_bf16()
    print(f"full-size SD1.5 txt2img, {args.px} px, {args.steps} steps, {CORES} cores, median of {args.rounds}; "
          f"native bf16 ({'/'.join(NATIVE_BF16_FLAGS)}): {'yes' if native else 'no'}")
    for mode in order:
        print(f"  {mode}  {medians[mode]:6.1f} s per image  ratio to fp32 {medians[mode] / medians['fp32']:.3f}")
    print(f"  largest pixel difference bf16 - fp32: {gap:.3f} ({gap * 255:.1f}/255)")
    print(json.dumps({"px": args.px, "steps": args.steps, "native_bf16": native, "median_s": medians,
                      "max_pixel_difference": gap}))


if __name__ == "__main__":
    main()
