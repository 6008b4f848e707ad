"""ComfyUI's SD1.5 templates that go beyond text-to-image, run end to end on tiny models.

Each runs from the editor file exactly as ComfyUI's template package ships it
(only file names, sizes and step counts are overridden) and is tied to something
proven elsewhere: ``image2image`` equals diffusers' img2img pipeline (ComfyUI's
``denoise`` d with n steps runs the last n steps of its n/d-step schedule, which
diffusers enters at strength d); ``hiresfix_latent_workflow`` feeds its second
sampler the first one's latent, upscaled as ``LatentUpscale`` says;
``esrgan_example`` and ``hiresfix_esrgan_workflow`` pass the decoded image
through the upscale model exactly as spandrel's own call does.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tiny_models
from engine.context import Environment, Paths
from engine.executor import Executor
from engine.formats import parse_document as parse
from engine.registry import default_registry
from nodes.runtime.models import ModelManager
from nodes.samplers import schedules
from test_upscale_model import make_esrgan, reference

ESRGAN = "tiny-esrgan-2x.safetensors"


def _template(name: str) -> dict:
    import comfyui_workflow_templates

    folder = Path(comfyui_workflow_templates.__file__).parent / "templates"
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture
def env(tmp_path, tiny_models_dir):
    """A models folder of its own (the session's tiny SD1 checkpoint, copied, and a tiny ESRGAN),
    so that nothing written here changes what other tests' model lists show."""
    models = Path(tmp_path) / "models"
    (models / "checkpoints").mkdir(parents=True)
    name = tiny_models.checkpoint_name("sd1")
    shutil.copyfile(Path(tiny_models_dir) / "checkpoints" / name, models / "checkpoints" / name)
    make_esrgan(models / "upscale_models" / ESRGAN)
    environment = Environment(paths=Paths.under(tmp_path / "data", models=models), models=ModelManager(device="cpu"))
    yield environment
    environment.models.unload_all(collect=False)


def _run(registry, env, name: str, overrides: dict):
    wf = parse(_template(name), registry).with_overrides(overrides)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return wf, outcome


def test_image2image_template_equals_diffusers_img2img(registry, env):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from nodes.sample_image import draw_landscape

    draw_landscape(64, 64).save(env.paths.input.root / "example.png")
    # 64x64 scaled to 0.015625 x 1024^2 pixels = 128x128; 10 steps at denoise 0.5 = the last 10 of 20.
    # Euler, not the template's dpmpp_2m: diffusers' Euler takes a given sigma list (ComfyUI's "normal"
    # schedule, pinned to ComfyUI's own numbers in test_sampling), its DPM-Solver does not.
    wf, outcome = _run(registry, env, "image2image", {
        "14.ckpt_name": tiny_models.checkpoint_name("sd1"), "18.megapixels": 0.015625,
        "3.steps": 10, "3.denoise": 0.5, "3.sampler_name": "euler"})
    ours = outcome.results["8"][0].numpy()
    init_latent = outcome.results["12"][0]["samples"]
    assert init_latent.shape == (1, 4, 16, 16)

    pipe = tiny_models.pipeline("sd1", cls=StableDiffusionImg2ImgPipeline)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas = schedules.comfy_schedule(schedules.TrainingSchedule(pipe.scheduler.config), "normal", 20)
    reference_image = pipe(sigmas=sigmas.tolist(), prompt=wf.nodes["6"].inputs["text"], negative_prompt=wf.nodes["7"].inputs["text"],
                           image=init_latent * pipe.vae.config.scaling_factor, strength=0.5,
                           guidance_scale=float(wf.nodes["3"].inputs["cfg"]),
                           output_type="np",
                           generator=torch.Generator("cpu").manual_seed(wf.nodes["3"].inputs["seed"])).images
    assert ours.shape == reference_image.shape == (1, 128, 128, 3)
    assert np.abs(ours - reference_image).max() <= 1 / 255
    decoded_input = outcome.results["18"][0].numpy()
    assert np.abs(ours - decoded_input).mean() > 0.01  # the sampler repainted something


def test_hiresfix_latent_template_upscales_the_first_pass_latent(registry, env):
    wf, outcome = _run(registry, env, "hiresfix_latent_workflow", {
        "16.ckpt_name": tiny_models.checkpoint_name("sd1"), "5.width": 64, "5.height": 64,
        "10.width": 96, "10.height": 96, "3.steps": 3, "11.steps": 3})
    assert (wf.nodes["3"].inputs["sampler_name"], wf.nodes["11"].inputs["scheduler"]) == ("dpmpp_sde", "simple")
    first = outcome.results["3"][0]["samples"]
    upscaled = outcome.results["10"][0]["samples"]
    assert first.shape == (1, 4, 8, 8) and upscaled.shape == (1, 4, 12, 12)
    assert torch.allclose(upscaled, F.interpolate(first, size=(12, 12), mode="nearest-exact"))
    final = outcome.results["13"][0]
    assert final.shape == (1, 96, 96, 3) and float(final.std()) > 0.01
    preview = outcome.outputs["18"]["images"][0]
    saved = outcome.outputs["12"]["images"][0]
    with Image.open(env.paths.output.resolve(saved["filename"], saved.get("subfolder", ""))) as png:
        assert png.size == (96, 96)
    assert preview["type"] == "temp"


@pytest.mark.parametrize("name,decode,upscale", [("esrgan_example", "8", "14"),
                                                 ("hiresfix_esrgan_workflow", "21", "22")])
def test_esrgan_templates_upscale_as_spandrel_does(registry, env, name, decode, upscale):
    sizes = {"esrgan_example": {"4.ckpt_name": tiny_models.checkpoint_name("sd1"), "13.model_name": ESRGAN,
                                "3.steps": 3},
             "hiresfix_esrgan_workflow": {"25.ckpt_name": tiny_models.checkpoint_name("sd1"), "23.model_name": ESRGAN,
                                          "24.width": 96, "24.height": 96, "3.steps": 3, "11.steps": 3}}[name]
    _, outcome = _run(registry, env, name, {"5.width": 64, "5.height": 64, **sizes})
    decoded = outcome.results[decode][0]
    upscaled = outcome.results[upscale][0]
    assert decoded.shape == (1, 64, 64, 3) and upscaled.shape == (1, 128, 128, 3)
    expected = reference(Path(env.paths.models.root) / "upscale_models" / ESRGAN, decoded)
    assert torch.allclose(upscaled, expected, atol=1e-5)
    if name == "hiresfix_esrgan_workflow":  # ImageScale to 96, encoded, repainted at denoise 0.5
        assert outcome.results["24"][0].shape == (1, 96, 96, 3)
        assert outcome.results["13"][0].shape == (1, 96, 96, 3)
