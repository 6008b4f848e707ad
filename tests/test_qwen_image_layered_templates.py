"""ComfyUI's Qwen-Image-Layered templates (image_qwen_image_layered.json, _control.json) from their editor
files on the tiny layered model saved under the names they ask for (tests/tiny_qwen_image_layered.py).

Both validate with only their model files and picture missing; both run (LoadImage,
ImageScaleToMaxDimension, GetImageSize, VAEEncode, ReferenceLatent on both prompts,
ModelSamplingAuraFlow 1, EmptyQwenImageLayeredLatentImage, KSampler, LatentCut t, LatentCutToBatch,
VAEDecode, SaveImage) and save two RGBA layers. The image template (its text-to-layers subgraph is
switched off in the file) gives QwenImageLayeredPipeline's layers for its own prompt, seed and cfg.
The control one loads its transformer as fp8_e4m3fn, so it is checked for running and its output's form.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_qwen_image_layered as tiny
from flow_family_files import env, registry, run, template_file_errors  # noqa: F401 (fixtures)
from test_qwen_image_layered import LAYERS, SIZE, TOL, diffusers, picture

TEMPLATES = ("image_qwen_image_layered.json", "image_qwen_image_layered_control.json")
#: The names the templates ask for (their UNETLoader, CLIPLoader, VAELoader).
NAMES = dict(unet=("qwen_image_layered_bf16.safetensors", "qwen_image_layered_control_bf16.safetensors"),
             clip="qwen_2.5_vl_7b_fp8_scaled.safetensors", vae="qwen_image_layered_vae.safetensors")


def _template(name: str) -> dict:
    import comfyui_workflow_templates_json as module

    return json.loads((Path(module.__file__).parent / "templates" / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny.save_files(tmp_path_factory.mktemp("qwen-layered-templates"))
    for unet in NAMES["unet"]:
        shutil.copy(root / "diffusion_models" / tiny.FILES["unet"], root / "diffusion_models" / unet)
    shutil.copy(root / "text_encoders" / tiny.FILES["clip"], root / "text_encoders" / NAMES["clip"])
    shutil.copy(root / "vae" / tiny.FILES["vae"], root / "vae" / NAMES["vae"])
    return root


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_validate_with_only_their_files_missing(registry, name, tmp_path):
    _, files = template_file_errors(registry, _template(name), tmp_path)  # no unknown node type
    assert files and files <= {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"),
                               ("VAELoader", "vae_name"), ("LoadImage", "image")}, files


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_run_and_save_rgba_layers(registry, env, root, name, monkeypatch):
    from engine.formats import parse_document

    wf = parse_document(_template(name), registry)
    of = lambda t: [n for n in wf.nodes.values() if n.type == t]  # noqa: E731
    (load,), (scale,), (sampler,), (save,) = of("LoadImage"), of("ImageScaleToMaxDimension"), of("KSampler"), \
        of("SaveImage")
    pixels = picture(3)
    Image.fromarray(np.round(pixels[0] * 255).astype(np.uint8)).save(env.paths.input.root / load.inputs["image"])
    scale.inputs["largest_size"] = SIZE  # the picture is already SIZE: no resampling
    sampler.inputs["steps"] = 2
    outcome = run(registry, env, wf)
    layers = outcome.results[save.inputs["images"].node_id][0].numpy()
    assert layers.shape == (LAYERS, SIZE, SIZE, 4) and np.isfinite(layers).all()
    saved = sorted(env.paths.output.root.rglob("*.png"))
    assert len(saved) == LAYERS and Image.open(saved[0]).mode == "RGBA"
    if name == TEMPLATES[0]:
        (positive,) = [n for n in of("CLIPTextEncode") if not isinstance(n.inputs["text"], str)]
        prompt = outcome.results[positive.inputs["text"].node_id][0]
        want = diffusers(pixels, monkeypatch, prompt=prompt, negative="", cfg=float(sampler.inputs["cfg"]),
                         seed=int(sampler.inputs["seed"]))
        assert float(np.abs(layers - want).max()) <= TOL
