"""`make run` and `make serve` on a fresh machine: a sample image and a checkpoint.

Kiln never downloads weights, so a fresh clone has no model. Rather than fail, the
demo builds a small random-weight SD1-shaped checkpoint (seconds, a few MB) and
says loudly that its images are noise: that proves the whole pipeline (loader,
text encoder, VAE, sampler, files) works here, and tells the user where a real
model goes. A real checkpoint in the folder is always preferred to the demo one.

    python -m nodes.demo prepare [--models DIR] [--input DIR ...]
    python -m nodes.demo run [--models DIR] [--input DIR] [--output DIR] [kiln run options]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from engine.model_files import folder_models
from nodes.sample_image import ensure_sample

DEMO_NAME = "kiln-demo-random-weights.safetensors"
SAMPLE_NAME = "sample.png"
WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "img2img.json"

NOISE_WARNING = f"""\
*** No checkpoint in {{folder}}: using {DEMO_NAME}, a tiny model with RANDOM
*** weights made on this machine. Its images are noise, not art; they only show
*** that the pipeline runs. For real images put a Stable Diffusion 1.x, 2.x or
*** SDXL .safetensors file (or a diffusers folder) in {{folder}}.
"""


def build_demo_checkpoint(path: Path) -> Path:
    """A tiny SD1-shaped single-file checkpoint with seeded random weights."""
    from safetensors.torch import save_file

    from nodes.checkpoint.tiny import build_components
    from nodes.checkpoint.to_original import components_to_original

    state = components_to_original(build_components("sd1", seed=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
              metadata={"kiln_demo": "random weights: images are noise"})
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def choose_checkpoint(models: Path) -> tuple[str, bool]:
    """(name inside checkpoints/, is_demo): the first real checkpoint, else the demo one."""
    folder = models / "checkpoints"
    real = [n for n in folder_models(models, "checkpoints") if Path(n).name != DEMO_NAME]
    if real:
        return real[0], False
    if not (folder / DEMO_NAME).exists():
        print(f"building the random-weight demo checkpoint {folder / DEMO_NAME} ...", file=sys.stderr)
        build_demo_checkpoint(folder / DEMO_NAME)
    return DEMO_NAME, True


def prepare(models: Path, inputs: Sequence[Path]) -> tuple[str, bool]:
    for folder in inputs:
        ensure_sample(folder / SAMPLE_NAME)
    name, is_demo = choose_checkpoint(models)
    if is_demo:
        print(NOISE_WARNING.format(folder=models / "checkpoints"), file=sys.stderr)
    else:
        print(f"checkpoint: {name}", file=sys.stderr)
    return name, is_demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.demo")
    parser.add_argument("command", choices=["prepare", "run"])
    parser.add_argument("--models", default="models", type=Path)
    parser.add_argument("--input", action="append", type=Path, help="input folder(s) to put the sample image in")
    parser.add_argument("--output", default="output")
    parser.add_argument("--workflow", default=str(WORKFLOW))
    args, rest = parser.parse_known_args(argv)
    inputs = args.input or [Path("input")]
    name, is_demo = prepare(args.models, inputs)
    if args.command == "prepare":
        return 0
    from engine.cli import main as kiln

    # The demo model's output is noise at any size: 256 px keeps its run to seconds.
    size = ["--set", "width=256", "--set", "height=256"] if is_demo else []
    return kiln(["run", args.workflow, "--models", str(args.models), "--input-dir", str(inputs[0]),
                 "--output-dir", args.output, "--set", f"checkpoint={name}", "--set", f"image={SAMPLE_NAME}",
                 *size, *rest])


if __name__ == "__main__":
    sys.exit(main())
