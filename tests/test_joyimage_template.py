"""ComfyUI's JoyImage Edit template (``image_joyai_image_edit``, comfyui-workflow-templates-json), as its
editor saved it: LoadImage -> ImageScaleToTotalPixels -> GetImageSize -> its subgraph (UNETLoader on the
int8_convrot transformer, CLIPLoader type joyimage, VAELoader, CFGNorm, TextEncodeJoyImageEdit for the
prompt and the empty negative with the picture and the VAE, EmptySD3LatentImage, KSampler euler/normal,
VAEDecode) -> SaveImageAdvanced and ImageCompare.

It validates with only its model files and picture missing, and runs unchanged on tiny files saved under
the names it asks for (the picture and the step count made small). At cfg 1 (CFGNorm then changes
nothing) it gives JoyImageEditPipeline's picture from the int8 files' dequantised weights; as shipped
(cfg 4 with CFGNorm) it runs and its picture matters.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_joyimage
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, save_state, template, template_file_errors  # noqa: F401 (fixtures)

NAME = "image_joyai_image_edit.json"
UNET, CLIP, VAE, PICTURE = ("joyai_image_edit_int8_convrot.safetensors",
                            "qwen3vl_8b_joyimage_edit_int8_convrot.safetensors", "wan_2.1_vae.safetensors",
                            "perfume_bottle.png.png")
#: The picture's size: ImageScaleToTotalPixels at its least 0.01 megapixels (steps of 16) keeps it, and it
#: is its own bucket here, so the latent, the reference and the pipeline's size agree.
W, H = 128, 80


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The tiny files under the template's names: the transformer and the Qwen3-VL quantised to int8_convrot
    by comfy-kitchen's rule (each one's dequantised twin beside it for the reference), the Wan VAE as it is."""
    from test_int8_quant import quantise_int8

    from nodes.checkpoint.qwen_image_vae import to_original

    root = tmp_path_factory.mktemp("joyimage-template")
    int8, twin = quantise_int8(tiny_joyimage.transformer_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / UNET, int8)
    save_state(root / "diffusion_models" / "twin.safetensors", twin)
    int8, twin = quantise_int8(tiny_joyimage.comfy_text_state())
    save_state(root / "text_encoders" / CLIP, int8)
    save_state(root / "text_encoders" / "twin.safetensors", twin)
    save_state(root / "vae" / VAE, to_original(tiny_joyimage.components()["vae"].state_dict()))
    return root


@pytest.fixture(autouse=True)
def small(monkeypatch):
    tiny_joyimage.small_buckets(monkeypatch, [(H, W), (W, H), (96, 96)])


def _run(registry, env, picture, **overrides) -> np.ndarray:
    picture.save(env.paths.input.root / PICTURE, format="PNG")
    wf = parse_document(template(NAME), registry).with_overrides(
        {"173.megapixels": 0.01, "170:10.steps": 2, **overrides})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["170:11"][0].numpy()


def test_the_template_validates_with_only_its_files_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, template(NAME), tmp_path)  # no unknown node type
    assert files and files <= {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
                                ("LoadImage", "image")}, files
    assert wf.nodes["170:4"].inputs["type"] == "joyimage"
    assert wf.nodes["170:174"].type == wf.nodes["170:177"].type == "TextEncodeJoyImageEdit"


def test_the_template_runs_and_equals_joyimage_edit_pipeline(registry, env, root):
    from nodes.checkpoint.load import open_state

    picture = tiny_joyimage.picture(0, W, H)
    ours = _run(registry, env, picture, **{"170:10.cfg": 1.0})
    pipe = tiny_joyimage.pipeline()
    twin = {k[len("model.diffusion_model."):]: v for k, v in open_state(root / "diffusion_models" /
                                                                          "twin.safetensors").items()}
    pipe.transformer = type(pipe.transformer).from_config(pipe.transformer.config)
    pipe.transformer.load_state_dict({k: torch.as_tensor(v) for k, v in twin.items()})
    pipe.text_encoder = copy.deepcopy(pipe.text_encoder)
    text = open_state(root / "text_encoders" / "twin.safetensors")
    missing, unexpected = pipe.text_encoder.load_state_dict(
        {("model.language_model." + k[len("model."):]) if k.startswith("model.") else "model." + k: torch.as_tensor(v)
         for k, v in text.items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head: never read for conditioning
    with torch.no_grad():
        theirs = pipe(image=picture, prompt="Change the background to a glacial scene.", num_inference_steps=2,
                      guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(42)).images
    gap = float(np.abs(ours - theirs).max())
    print(f"template gap {gap * 255:.5f}/255")
    assert ours.shape == theirs.shape == (1, H, W, 3) and gap <= 1 / 255 + 1e-6


def test_the_template_as_shipped_reads_its_picture(registry, env):
    """cfg 4 with CFGNorm, as shipped: another picture gives another image."""
    first = _run(registry, env, tiny_joyimage.picture(0, W, H))
    second = _run(registry, env, tiny_joyimage.picture(1, W, H))
    assert first.shape == (1, H, W, 3) and np.abs(first - second).max() > 0.02
