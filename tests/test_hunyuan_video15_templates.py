"""ComfyUI's Capybara text-to-image template (comfyui-workflow-templates-json's
Image_capybara_v0_1_text_to_image.json), as its editor saved it (a subgraph).

It validates with only its model files missing. On the tiny HunyuanVideo 1.5 (tests/tiny_hunyuan_video15.py)
saved under the names it asks for (capybara_v0.1.safetensors, qwen_2.5_vl_7b.safetensors,
byt5_small_glyphxl_fp16.safetensors, hunyuanvideo15_vae_fp16.safetensors), at a tiny size and otherwise as
shipped (its prompt and negative, 20 steps, cfg 6, shift 7, euler/simple, its seed), it runs and gives
HunyuanVideo15Pipeline's frame (num_frames=1) for the same weights, seed, steps, guidance and shift.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny_hunyuan_video15 as tiny
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, template, template_file_errors  # noqa: F401 (fixtures)
from test_hunyuan_video15 import reference

NAME = "Image_capybara_v0_1_text_to_image.json"
SIZE = tiny.SIZE


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The tiny files under the template's names."""
    root = tiny.make_models_folder(tmp_path_factory.mktemp("capybara-templates"))
    for folder, ours, theirs in (("diffusion_models", "tiny-hunyuanvideo15", "capybara_v0.1"),
                                 ("text_encoders", "tiny-qwen_2.5_vl_7b", "qwen_2.5_vl_7b"),
                                 ("text_encoders", "tiny-byt5_small_glyphxl", "byt5_small_glyphxl_fp16"),
                                 ("vae", "tiny-hunyuanvideo15_vae", "hunyuanvideo15_vae_fp16")):
        (root / folder / f"{theirs}.safetensors").write_bytes((root / folder / f"{ours}.safetensors").read_bytes())
    return root


def test_the_template_validates_with_only_its_files_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, template(NAME), tmp_path)  # no unknown node type
    assert files and files <= {("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"),
                               ("DualCLIPLoader", "clip_name2"), ("VAELoader", "vae_name")}
    assert {n.inputs["type"] for n in wf.nodes.values() if n.type == "DualCLIPLoader"} == {"hunyuan_video_15"}


def test_the_template_runs_and_equals_hunyuan_video15_pipeline(registry, env):
    wf = parse_document(template(NAME), registry)
    latent, sched, guider, shift = (wf.nodes[i] for i in ("103:111", "103:17", "103:91", "103:67"))
    assert latent.type == "EmptyHunyuanVideo15Latent" and latent.inputs["length"] == 1
    steps, cfg, shift = sched.inputs["steps"], guider.inputs["cfg"], shift.inputs["shift"]
    assert (steps, cfg, shift) == (20, 6, 7)  # as shipped
    prompt, negative = wf.nodes["103:44"].inputs["text"], wf.nodes["103:93"].inputs["text"]
    seed = wf.nodes["103:25"].inputs["noise_seed"]
    wf = wf.with_overrides({"103:111.width": SIZE, "103:111.height": SIZE})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["103:8"][0].numpy()
    theirs = reference(prompt, negative, seed, steps, float(cfg), float(shift))
    gap = np.abs(ours - theirs).max()
    print(f"{NAME}: {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    other = Executor(registry, env).run(wf.with_overrides({"103:25.noise_seed": seed + 1})).results["103:8"][0]
    assert np.abs(ours - other.numpy()).max() > 10 * gap + 0.02  # the seed matters: not vacuous


EDIT = "Image_capybara_v0_1_image_edit.json"


def test_the_edit_template_validates_with_only_its_files_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, template(EDIT), tmp_path)  # no unknown node type
    assert files and files <= {("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"),
                               ("DualCLIPLoader", "clip_name2"), ("VAELoader", "vae_name"),
                               ("CLIPVisionLoader", "clip_name"), ("LoadImage", "image")}


def test_the_edit_template_runs_and_equals_the_image_to_video_pipeline(registry, env, root):
    """As shipped (its instruction, negative, seed, 20 steps, cfg 6, shift 7) on the tiny files, its picture
    already at the tiny size the resize node is set to: HunyuanVideo15ImageToVideoPipeline's frame."""
    import shutil

    import torch

    from test_hunyuan_video15 import _picture

    shutil.copy(root / "clip_vision" / "tiny-sigclip.safetensors",
                root / "clip_vision" / "sigclip_vision_patch14_384.safetensors")
    _picture().save(env.paths.input.root / "wind_woman.png")
    document = template(EDIT)
    for sub in document["definitions"]["subgraphs"]:  # the resize node's size (a dotted name: not an override)
        for node in sub["nodes"]:
            if node["type"] == "ResizeImageMaskNode":
                node["widgets_values"][1:3] = [SIZE, SIZE]
    wf = parse_document(document, registry)
    assert (wf.nodes["103:105"].inputs["resize_type.width"], wf.nodes["103:105"].inputs["resize_type.height"]) == (
        SIZE, SIZE)
    steps, cfg, shift = (wf.nodes["103:17"].inputs["steps"], wf.nodes["103:91"].inputs["cfg"],
                         wf.nodes["103:67"].inputs["shift"])
    prompt, negative = wf.nodes["103:44"].inputs["text"], wf.nodes["103:93"].inputs["text"]
    seed = wf.nodes["103:25"].inputs["noise_seed"]
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["103:8"][0].numpy()
    noise = torch.randn((1, 32, SIZE // 16, SIZE // 16), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        theirs = tiny.pipeline(float(cfg), float(shift), edit=True)(
            image=_picture(), prompt=prompt, negative_prompt=negative, num_frames=1, num_inference_steps=steps,
            latents=noise.unsqueeze(2), output_type="np").frames
    theirs = np.asarray(theirs)[:, 0]
    gap = np.abs(ours - theirs).max()
    print(f"{EDIT}: {gap * 255:.5f}/255")
    assert ours.shape == theirs.shape and gap <= 1 / 255, gap
