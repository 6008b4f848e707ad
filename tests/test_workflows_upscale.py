"""The shipped upscale.json and hires-fix.json, and img2img.json's ``samples``, run on tiny models.

Each check ties a workflow to something already proven: the hires fix's first pass
is txt2img.json's result (itself equal to diffusers' pipeline), its second pass at
strength 0 is the decoded upscaled latent; upscale.json equals spandrel's own call;
and image i of an img2img job with ``samples`` = n equals a single run with seed + i.
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
from test_upscale_model import make_esrgan, reference

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
SIZE = 64


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def run(registry, env, name: str, executor=None, **params):
    wf = load(WORKFLOWS / name).with_overrides(params)
    outcome = (executor or Executor(registry, env)).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def test_img2img_samples_gives_image_i_the_single_run_with_seed_plus_i(registry, tiny_env):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(tiny_env.paths.input.root / "init.png")
    common = dict(checkpoint=tiny_models.checkpoint_name("sd1"), image="init.png", width=SIZE, height=SIZE,
                  strength=0.7, steps=4, sampler="euler_ancestral", scheduler="normal")
    executor = Executor(registry, tiny_env)
    batch = run(registry, tiny_env, "img2img.json", executor, samples=3, seed=11, **common).results["9"][0]
    assert batch.shape == (3, SIZE, SIZE, 3)
    for i in range(3):
        single = run(registry, tiny_env, "img2img.json", executor, samples=1, seed=11 + i, **common).results["9"][0]
        assert torch.allclose(batch[i], single[0], atol=1e-5), i
    assert float((batch[0] - batch[1]).abs().max()) > 0.01  # variations, not copies


def test_hires_fix_is_txt2img_then_image_to_image_on_the_upscaled_latent(registry, tiny_env):
    common = dict(checkpoint=tiny_models.checkpoint_name("sd1"), width=SIZE, height=SIZE, steps=4, cfg=6.0,
                  sampler="euler", scheduler="normal", seed=5)
    executor = Executor(registry, tiny_env)
    plain = run(registry, tiny_env, "txt2img.json", executor, **common)
    hires = run(registry, tiny_env, "hires-fix.json", executor, scale=2.0, strength=0.5, hires_steps=4, **common)
    first_pass = hires.results["5"][0]["samples"]
    assert torch.equal(first_pass, plain.results["5"][0]["samples"])
    upscaled = hires.results["6"][0]["samples"]
    assert upscaled.shape == (1, 4, SIZE // 4, SIZE // 4)
    image = hires.results["9"][0]
    assert image.shape == (1, 2 * SIZE, 2 * SIZE, 3) and float(image.std()) > 0.01
    saved = hires.outputs["10"]["images"][0]
    with Image.open(tiny_env.paths.output.resolve(saved["filename"], saved.get("subfolder", ""))) as png:
        assert png.size == (2 * SIZE, 2 * SIZE)
    # strength 0 repaints nothing: the result is the upscaled latent, decoded
    kept = run(registry, tiny_env, "hires-fix.json", executor, scale=2.0, strength=0.0, hires_steps=4, **common)
    from nodes.vae import vae_decode
    from node_call import call

    vae = kept.results["1"][2]
    (decoded,) = call(vae_decode, tiny_env, samples=kept.results["6"][0], vae=vae)
    assert torch.equal(kept.results["9"][0], decoded)
    assert float((image - decoded).abs().mean()) > 0.01  # strength 0.5 did repaint


def test_upscale_workflow_equals_spandrel_and_scales_after(registry, tmp_path):
    models = ModelManager(device="cpu")
    env = Environment(paths=Paths.under(tmp_path / "data"), models=models)
    try:
        path = make_esrgan(Path(env.paths.models.root) / "upscale_models" / "tiny-esrgan-2x.safetensors")
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(env.paths.input.root / "small.png")
        outcome = run(registry, env, "upscale.json", image="small.png", upscale_model="tiny-esrgan-2x.safetensors")
        loaded = outcome.results["1"][0]
        result = outcome.results["4"][0]
        assert result.shape == (1, 48, 64, 3)
        assert torch.allclose(result, reference(path, loaded), atol=1e-6)
        saved = outcome.outputs["5"]["images"][0]
        assert (env.paths.output.root / saved["filename"]).is_file()
        halved = run(registry, env, "upscale.json", image="small.png", upscale_model="tiny-esrgan-2x.safetensors",
                     scale=0.5, tile_size=64)
        assert halved.results["4"][0].shape == (1, 24, 32, 3)
    finally:
        models.unload_all(collect=False)
