"""The shipped inpaint.json and outpaint.json, run by the real executor on tiny models.

inpaint.json with a plain SD1 checkpoint and with a 9-channel SD1 inpainting one: the
transparent region of the input PNG is repainted, every pixel outside the grown mask
is the input's exactly (the workflow composites through the mask), and the two
checkpoints give different repaints (the inpainting model's extra channels are fed).
outpaint.json: the canvas grows by the given sides and the original region is kept.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
from engine.context import Environment, Paths
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import load
from nodes.runtime.models import ModelManager

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
SIZE = 64


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture()
def env(tmp_path):
    """Its own models folder (plain and inpainting SD1), so the session's shared folder is untouched."""
    models = tmp_path / "models"
    tiny_models.save_single_file("sd1", models / "checkpoints" / "tiny-sd1.safetensors")
    tiny_models.save_single_file("sd1-inpaint", models / "checkpoints" / "tiny-sd1-inpaint.safetensors",
                                 parts=tiny_models.components("sd1-inpaint"))
    manager = ModelManager(device="cpu")
    env = Environment(paths=Paths.under(tmp_path / "data", models=models), models=manager)
    yield env
    manager.unload_all(collect=False)


def _input_png(env, name: str) -> np.ndarray:
    """A landscape with a transparent rectangle (rows 16..40, columns 24..48): the region to repaint."""
    from nodes.sample_image import draw_landscape

    rgba = np.array(draw_landscape(SIZE, SIZE).convert("RGBA"))
    rgba[16:40, 24:48, 3] = 0
    Image.fromarray(rgba).save(env.paths.input.root / name)
    return rgba


def run(registry, env, name: str, **params):
    wf = load(WORKFLOWS / name).with_overrides(params)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def test_inpaint_workflow_repaints_only_the_masked_region(registry, env):
    rgba = _input_png(env, "hole.png")
    common = dict(image="hole.png", steps=4, cfg=7.0, sampler="euler", scheduler="normal", seed=3, grow_mask=4)
    results = {}
    for ckpt in ("tiny-sd1.safetensors", "tiny-sd1-inpaint.safetensors"):
        outcome = run(registry, env, "inpaint.json", checkpoint=ckpt, **common)
        image = outcome.results["10"][0][0]
        source = outcome.results["4"][0][0]
        grown = outcome.results["5"][0][0]
        assert image.shape == (SIZE, SIZE, 3)
        outside = grown < 0.5
        assert bool(outside[0, 0]) and not bool(outside[20, 30])
        assert torch.equal(image[outside], source[outside])  # the input's pixels exactly
        inside = (image - source).abs()[torch.from_numpy(rgba[..., 3] == 0)]
        assert float(inside.mean()) > 0.02  # repainted
        results[ckpt] = image
    assert float((results["tiny-sd1.safetensors"] - results["tiny-sd1-inpaint.safetensors"]).abs().max()) > 0.01


def test_outpaint_workflow_extends_the_canvas(registry, env):
    _input_png(env, "hole.png")
    outcome = run(registry, env, "outpaint.json", checkpoint="tiny-sd1-inpaint.safetensors", image="hole.png",
                  right=32, bottom=16, feathering=0, steps=4, sampler="euler", scheduler="normal", seed=2)
    image = outcome.results["9"][0][0]
    assert image.shape == (SIZE + 16, SIZE + 32, 3)
    padded = outcome.results["5"][0][0]
    new = (image - padded).abs()
    assert float(new[:, SIZE:].mean()) > 0.02 and float(new[SIZE:, :].mean()) > 0.02  # the border was painted
    saved = outcome.outputs["10"]["images"][0]
    with Image.open(env.paths.output.resolve(saved["filename"], saved.get("subfolder", ""))) as png:
        assert png.size == (SIZE + 32, SIZE + 16)
