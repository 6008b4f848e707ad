"""The shipped controlnet-img2img.json on tiny models.

Tied to what is already proven: with control_strength 0 (or control_end 0) it is
img2img.json's image exactly (that workflow equals diffusers' img2img pipeline); with
the ControlNet on, the image changes and follows the ControlNet test's parity
(tests/test_controlnet.py). The hint is the Canny edge map of the input.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_models
from engine.context import Environment, Paths
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import load
from nodes.runtime.models import ModelManager

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SIZE = 64
CN_NAME = "control_v11p_sd15_canny.safetensors"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from nodes.sample_image import draw_landscape

    root = tmp_path_factory.mktemp("cnwf")
    models = root / "models"
    tiny_models.save_single_file("sd1", models / "checkpoints" / tiny_models.checkpoint_name("sd1"))
    tiny_models.save_controlnet(tiny_models.controlnet("sd1"), models / "controlnet" / CN_NAME, "original")
    env = Environment(paths=Paths.under(root / "data", models=models), models=ModelManager(device="cpu"))
    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "init.png")
    yield env
    env.models.unload_all(collect=False)


def run(executor, name: str, **params):
    outcome = executor.run(load(WORKFLOWS / name).with_overrides(params))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def test_controlnet_img2img_workflow(env):
    executor = Executor(default_registry(), env)
    common = dict(checkpoint=tiny_models.checkpoint_name("sd1"), image="init.png", width=SIZE, height=SIZE,
                  strength=0.7, steps=4, cfg=6.0, sampler="euler", scheduler="normal", seed=3)
    plain = run(executor, "img2img.json", **common).results["9"][0]
    on = run(executor, "controlnet-img2img.json", controlnet=CN_NAME, control_strength=1.0,
             low_threshold=0.2, high_threshold=0.5, **common)
    edges = on.results["12"][0]
    assert edges.shape == (1, SIZE, SIZE, 3) and set(edges.unique().tolist()) == {0.0, 1.0}
    image = on.results["9"][0]
    assert image.shape == plain.shape and float((image - plain).abs().max()) > 0.02
    assert on.outputs["10"]["images"][0]["filename"].startswith("controlnet-img2img")
    for off in (dict(control_strength=0.0), dict(control_end=0.0)):
        same = run(executor, "controlnet-img2img.json", controlnet=CN_NAME, **off, **common).results["9"][0]
        assert torch.equal(same, plain), off
