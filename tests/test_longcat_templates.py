"""ComfyUI's LongCat-Image templates (comfyui-workflow-templates-json), as its editor saved them.

Both validate with only their model files missing. The text-to-image template runs unchanged on tiny
files saved under the names it asks for (UNETLoader longcat_image_bf16, CLIPLoader type longcat_image on
qwen_2.5_vl_7b_fp8_scaled, VAELoader ae, CFGNorm, FluxGuidance, EmptySD3LatentImage, KSampler
euler/simple), at 64x64 and 3 steps. Without its CFGNorm it gives LongCatImagePipeline's picture (renorm
off: the pipeline's renorm is another rule than CFGNorm's); its CFGNorm changes the picture. The Edit
template (LoadImage, ImageScaleToTotalPixels, TextEncodeQwenImageEdit with the VAE for both prompts,
FluxKontextMultiReferenceLatentMethod index, VAEEncode for the latent, KSampler) runs unchanged on its tiny
files at its smallest size and 2 steps, and its picture changes the image.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_longcat
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, template, template_file_errors  # noqa: F401 (fixtures)

T2I, EDIT = "image_longcat_text_to_image.json", "image_longcat_image_edit.json"
SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_longcat.make_models_folder(tmp_path_factory.mktemp("longcat-templates"),
                                          unet="longcat_image_bf16.safetensors",
                                          clip="qwen_2.5_vl_7b_fp8_scaled.safetensors", vae="ae.safetensors")
    (root / "diffusion_models" / "longcat_image_edit_bf16.safetensors").write_bytes(
        (root / "diffusion_models" / "longcat_image_bf16.safetensors").read_bytes())
    return root


@pytest.mark.parametrize("name", [T2I, EDIT])
def test_templates_validate_with_only_their_files_missing(registry, name, tmp_path):
    wf, files = template_file_errors(registry, template(name), tmp_path)  # no unknown node type
    allowed = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
               ("LoadImage", "image")}
    assert files and files <= allowed, files
    clip = next(n for n in wf.nodes.values() if n.type == "CLIPLoader")
    assert clip.inputs["type"] == "longcat_image"  # a type Kiln's CLIPLoader offers


def _t2i(registry) -> object:
    wf = copy.deepcopy(parse_document(template(T2I), registry))
    wf.nodes["13:6"].inputs.update(width=SIZE, height=SIZE)  # ResolutionSelector's 1 MP, at test size
    return wf.with_overrides({"13:7.steps": STEPS})


def _image(registry, env, wf) -> np.ndarray:
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["13:8"][0].numpy()


def test_text_to_image_template_runs_and_equals_the_pipeline_without_its_cfg_norm(registry, env):
    wf = _t2i(registry)
    shipped = _image(registry, env, wf)
    assert shipped.shape == (1, SIZE, SIZE, 3)
    plain = copy.deepcopy(wf)
    plain.nodes["13:7"].inputs["model"] = plain.nodes["13:10"].inputs["model"]  # CFGNorm taken out
    ours = _image(registry, env, plain)
    k = wf.nodes["13:7"].inputs
    with torch.no_grad():
        theirs = tiny_longcat.pipeline()(
            prompt=wf.nodes["13:4"].inputs["text"], negative_prompt=wf.nodes["13:5"].inputs["text"], height=SIZE,
            width=SIZE, num_inference_steps=STEPS, guidance_scale=k["cfg"], output_type="np",
            generator=torch.Generator("cpu").manual_seed(k["seed"]), enable_cfg_renorm=False,
            enable_prompt_rewrite=False).images
    gap = np.abs(ours - theirs).max()
    print(f"{T2I}: {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    assert np.abs(shipped - ours).max() > 1 / 255  # CFGNorm acts: not vacuous
    other = _image(registry, env, wf.with_overrides({"13:7.seed": k["seed"] + 1}))
    assert np.abs(other - shipped).max() > 0.02  # the seed matters


def _edit(registry, env, picture) -> np.ndarray:
    picture.save(env.paths.input.root / "steel_in_the_mist.png")
    wf = parse_document(template(EDIT), registry).with_overrides({"22:14.megapixels": 0.01, "22:7.steps": 2})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["22:8"][0].numpy()


def test_edit_template_runs_on_tiny_files_and_reads_its_picture(registry, env, monkeypatch):
    import tiny_qwen_image_edit
    from PIL import Image

    tiny_longcat.shrink_edit_area(monkeypatch)
    ours = _edit(registry, env, tiny_qwen_image_edit.picture(4, 120, 90))
    assert ours.shape[0] == 1 and ours.shape[1] * ours.shape[2] <= 0.012 * 1024 * 1024 and ours.shape[1] < ours.shape[2]
    other = _edit(registry, env, Image.new("RGB", (120, 90), (250, 250, 250)))
    assert np.abs(other - ours).max() > 0.5 / 255  # the picture matters: not vacuous
