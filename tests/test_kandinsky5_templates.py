"""ComfyUI's Kandinsky 5 template (``image_kandinsky5_t2i``, comfyui-workflow-templates-json), as its
editor saved it.

It validates with only its model files missing. On tiny files saved under the names it asks for
(``kandinsky5lite_t2i.safetensors``; ``qwen_2.5_vl_7b_fp8_scaled.safetensors``, really fp8_scaled, and
``clip_l.safetensors`` through DualCLIPLoader type kandinsky5_image; ``ae.safetensors``) the graph runs
unchanged but for its size (64x64): ModelSamplingSD3 3, KSampler euler/simple 50 steps cfg 3.5, an empty
negative. Its picture is Kandinsky5T2IPipeline's (the pipeline's Qwen2.5-VL holding the fp8 file's
dequantised weights; decoded as the pipeline decodes, as tests/test_kandinsky5.py explains).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

import tiny_kandinsky5
import tiny_qwen_image
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, save_state, template, template_file_errors  # noqa: F401 (fixtures)

NAME = "image_kandinsky5_t2i.json"
SIZE = tiny_kandinsky5.SIZE


@pytest.fixture(scope="module")
def dequantised() -> dict:
    """The Qwen2.5-VL file as saved (fp8_scaled) and its dequantised twin, ComfyUI's layout."""
    from test_scaled_fp8 import quantise

    scaled, plain = quantise(tiny_qwen_image.comfy_text_state())
    return {"scaled": scaled, "plain": plain}


@pytest.fixture(scope="module")
def root(tmp_path_factory, dequantised) -> Path:
    import tiny_flux

    root = tmp_path_factory.mktemp("kandinsky5-template")
    save_state(root / "diffusion_models" / "kandinsky5lite_t2i.safetensors", tiny_kandinsky5.transformer_state())
    save_state(root / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors", dequantised["scaled"])
    save_state(root / "text_encoders" / "clip_l.safetensors", tiny_flux.clip_l_state())
    save_state(root / "vae" / "ae.safetensors", tiny_flux.vae_state())
    return root


def test_the_template_validates_with_only_its_files_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, template(NAME), tmp_path)
    assert files == {("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
                     ("VAELoader", "vae_name")}, files
    clip = next(n for n in wf.nodes.values() if n.type == "DualCLIPLoader")
    assert clip.inputs["type"] == "kandinsky5_image"


def _pipeline_with(plain: dict) -> object:
    """The tiny pipeline, its Qwen2.5-VL holding ``plain`` (ComfyUI's layout) instead."""
    pipe = tiny_kandinsky5.pipeline()
    encoder = copy.deepcopy(pipe.text_encoder)
    renamed = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else
               ("model." + k) if k.startswith("visual.") else k: v for k, v in plain.items()}
    encoder.load_state_dict(renamed)
    pipe.text_encoder = encoder
    return pipe


def test_the_template_runs_on_tiny_files_and_equals_kandinsky5_pipeline(registry, env, dequantised):
    from test_kandinsky5 import decoded

    wf = parse_document(template(NAME), registry).with_overrides({"12:18.width": SIZE, "12:18.height": SIZE})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["12:9"][0].numpy()
    assert ours.shape == (1, SIZE, SIZE, 3)
    sampler = wf.nodes["12:8"].inputs
    prompt, negative = wf.nodes["12:7"].inputs["text"], wf.nodes["12:2"].inputs["text"]
    assert (sampler["steps"], sampler["cfg"], negative) == (50, 3.5, "") and len(prompt) > 500
    theirs = decoded(_pipeline_with(dequantised["plain"]), prompt, negative, sampler["seed"], 50, 3.5)[0]
    gap = np.abs(ours - theirs).max()
    print(f"template gap {gap * 255:.4f}/255")
    assert gap <= 1 / 255, gap
    other = Executor(registry, env).run(wf.with_overrides({"12:8.seed": sampler["seed"] + 1})).results["12:9"][0]
    assert np.abs(ours - other.numpy()).max() > 0.02  # the seed matters: not vacuous
