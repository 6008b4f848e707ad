"""Kiln's img2img workflow against diffusers' StableDiffusionImg2ImgPipeline, side by side.

    .venv/bin/python bench/img2img_vs_diffusers.py [--size full|tiny] [--px 256] [--steps 10]
                                                   [--strength 0.6] [--rounds 2]

Both sides run the same random-weight model (full SD1.5 shapes by default: no
weights can be downloaded here) at the same size, steps, strength, cfg, seed and
sampler (Euler). Kiln loads it from a single-file checkpoint through its real
loader; diffusers gets the very same modules in memory. Runs alternate A B A B
after one warm-up each, so a machine that slows down part-way hurts both sides
alike. Reported per side: median seconds per image, UNet forward calls (CFG runs
cond and uncond as one batch, so one call per step), and the ratio Kiln/diffusers.

Then Kiln's cache: the same workflow again with only the seed changed. Model
loading, both text encodings and the VAE encode are served from the cache, so
only AddNoise, the sampler and the decode run; the ratio against a forced cold run
is printed. A benchmark, not a test: nothing is asserted.
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
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(REPO))

# SD 1.5's widths and depths; what every SD1 model shares comes from nodes/families/sd1.py.
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), layers_per_block=2,
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768)
PROMPT, NEGATIVE = "a watercolor painting of a lake at sunset", "blurry"


def full_size_unet() -> Any:
    """SD 1.5's UNet with random weights (seeded), in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    from nodes.families.sd1 import FAMILY as SD1

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD1.unet_defaults(), **SD15_UNET, attention_head_dim=SD1.unet_heads([])).eval()


def full_size_components() -> dict[str, Any]:
    from diffusers import AutoencoderKL, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from nodes.checkpoint.clip_configs import text_config_defaults
    from nodes.families.sd1 import FAMILY as SD1
    from nodes.checkpoint.tokenizer import PAD_EOS, clip_tokenizer

    unet = full_size_unet()
    text = CLIPTextConfig(**text_config_defaults("openai"), **SD15_TE)
    return {"unet": unet, "vae": AutoencoderKL(**SD1.vae_defaults(), **SD_VAE).eval(),
            "text_encoder": CLIPTextModel(text).eval(), "tokenizer": clip_tokenizer(PAD_EOS),
            "scheduler": PNDMScheduler.from_config(SD1.scheduler_config())}


def tiny_components() -> dict[str, Any]:
    from nodes.checkpoint.tiny import build_components

    return build_components("sd1")


def saved_components(size: str, work: Path) -> dict[str, Any]:
    """A random-weight SD1 ("full" or "tiny") saved single-file as work/models/checkpoints/bench.safetensors,
    as a user's checkpoint is; returns its diffusers components for the reference side."""
    from safetensors.torch import save_file

    from nodes.checkpoint.to_original import components_to_original

    parts = full_size_components() if size == "full" else tiny_components()
    state = components_to_original(parts)
    (work / "models" / "checkpoints").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "models" / "checkpoints" / "bench.safetensors"))
    return parts


class UNetCalls:
    """Counts UNet forward calls anywhere in the process (both sides' UNets)."""

    def __init__(self) -> None:
        import torch
        from diffusers import UNet2DConditionModel

        self.count = 0

        def hook(module: Any, args: Any, output: Any) -> None:
            if isinstance(module, UNet2DConditionModel):
                self.count += 1

        torch.nn.modules.module.register_module_forward_hook(hook)

    def during(self, fn: Callable[[], Any]) -> tuple[float, int]:
        before, start = self.count, time.perf_counter()
        fn()
        return time.perf_counter() - start, self.count - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from engine.context import Environment, Paths
    from engine.executor import Executor
    from nodes.runtime.models import ModelManager
    from engine.registry import default_registry
    from engine.workflow import load
    from nodes.sample_image import draw_landscape

    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    t0 = time.perf_counter()
    parts = saved_components(args.size, work)
    print(f"built and saved a random-weight {args.size} SD1 model in {time.perf_counter() - t0:.1f} s")

    init = draw_landscape(args.px, args.px)
    env = Environment(paths=Paths.under(work / "data", models=work / "models"), models=ModelManager())
    init.save(env.paths.input.root / "init.png")
    workflow = load(REPO / "workflows" / "img2img.json").with_overrides({
        "checkpoint": "bench.safetensors", "image": "init.png", "width": args.px, "height": args.px,
        "prompt": PROMPT, "negative": NEGATIVE, "strength": args.strength, "steps": args.steps, "cfg": args.cfg,
        "sampler": "euler", "scheduler": "normal", "seed": 42})
    executor = Executor(default_registry(), env)

    pipe = StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def kiln(force: bool = True, wf: Any = workflow) -> None:
        outcome = executor.run(wf, force=force)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message

    def diffusers() -> None:
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init, strength=args.strength,
             num_inference_steps=args.steps, guidance_scale=args.cfg,
             generator=torch.Generator("cpu").manual_seed(42))

    calls = UNetCalls()
    t0 = time.perf_counter()
    kiln()
    print(f"kiln first run (loads the checkpoint): {time.perf_counter() - t0:.1f} s")
    diffusers()
    times: dict[str, list[float]] = {"kiln": [], "diffusers": []}
    unet: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, fn in (("kiln", kiln), ("diffusers", diffusers)):
            seconds, n = calls.during(fn)
            times[name].append(seconds)
            unet[name] = n
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.size} SD1, {args.px}x{args.px}, {args.steps} steps at strength {args.strength} "
          f"(= {int(args.steps * args.strength)} denoising steps), cfg {args.cfg}, Euler, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'side':<10} {'median s':>9} {'runs':>24} {'UNet calls':>11}")
    for name in ("kiln", "diffusers"):
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<10} {med[name]:>9.2f} {runs:>24} {unet[name]:>11}")
    print(f"kiln / diffusers: {med['kiln'] / med['diffusers']:.3f}")

    cold, _ = calls.during(lambda: kiln(force=True))
    reseeded = workflow.with_overrides({"seed": 43})
    warm, n = calls.during(lambda: kiln(force=False, wf=reseeded))
    print(f"\nseed-only change: {warm:.2f} s vs forced cold run {cold:.2f} s "
          f"(ratio {warm / cold:.3f}; {n} UNet calls)")
    print(json.dumps({"kiln_s": med["kiln"], "diffusers_s": med["diffusers"],
                      "ratio": med["kiln"] / med["diffusers"], "reseed_ratio": warm / cold}))


if __name__ == "__main__":
    main()
