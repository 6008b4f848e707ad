"""ComfyUI's Ideogram 4 templates (comfyui-workflow-templates-json), as its editor saved them.

``image_ideogram4_t2i`` and ``_int8`` validate with only their model files missing, and run unchanged on
the tiny files (tests/tiny_ideogram4.py; the int8 one on int8_convrot files of both transformers) except
for the picture's size (ResolutionSelector's megapixels at its minimum, 0.1, whose short side the
template's clamp lifts to 256) and the Turbo preset (12 steps) picked on its CustomCombo: the preset table is read by
JsonExtractString, the two transformers guided by DualModelGuider with CFGOverride's last-steps cfg, the
sigmas Ideogram4Scheduler's. The picture equals Ideogram4Pipeline's for the template's prompt and
settings within 1/255 per pixel (the pipeline given Kiln's noise and the override as its schedule).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_ideogram4
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, save_state, template_file_errors  # noqa: F401 (fixtures)
from nodes.checkpoint.ideogram4_keys import original_to_diffusers
from nodes.dual_model_nodes import ideogram4_sigmas
from nodes.families import ideogram4

TEMPLATES = ("image_ideogram4_t2i.json", "image_ideogram4_t2i_int8.json")
SIZE = 256
#: The Turbo preset in the templates' table (num_steps, mu, std).
TURBO = (12, 0.5, 1.75)


def _template(name: str) -> dict:
    import comfyui_workflow_templates_json as module

    return json.loads((Path(module.__file__).parent / "templates" / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_int8_quant import quantise_int8

    root = tiny_ideogram4.make_models_folder(tmp_path_factory.mktemp("ideogram4-templates"))
    for which, stem in (("transformer", "tiny-ideogram4"), ("unconditional_transformer", "tiny-ideogram4_unconditional")):
        int8, _ = quantise_int8(tiny_ideogram4.original_state(which), "model.diffusion_model.")
        save_state(root / "diffusion_models" / f"{stem}-int8_convrot.safetensors", int8)
    return root


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_validate_with_only_their_files_missing(registry, name, tmp_path):
    wf, files = template_file_errors(registry, _template(name), tmp_path)  # no unknown node type
    assert files and files <= {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name")}
    assert next(n for n in wf.nodes.values() if n.type == "CLIPLoader").inputs["type"] == "ideogram4"


@pytest.mark.parametrize("name,int8", [(TEMPLATES[0], False), (TEMPLATES[1], True)])
def test_templates_run_on_tiny_files_and_equal_ideogram4_pipeline(registry, env, name, int8):
    suffix = "-int8_convrot" if int8 else ""
    wf = parse_document(_template(name), registry).with_overrides({
        "98:23.unet_name": f"tiny-ideogram4{suffix}.safetensors",
        "98:154.unet_name": f"tiny-ideogram4_unconditional{suffix}.safetensors",
        "98:14.clip_name": "tiny-qwen3vl_8b.safetensors", "98:9.vae_name": "tiny-flux2-vae.safetensors",
        "98:156.choice": "Turbo", "37.megapixels": 0.1})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["98:13"][0].numpy()
    _, height, width, _ = ours.shape
    assert min(height, width) >= SIZE and height % 16 == width % 16 == 0  # 9:16 (t2i) or 1:1 (int8), clamped
    prompt, seed = wf.nodes["98:24"].inputs["text"], wf.nodes["98:18"].inputs["noise_seed"]
    steps, mu, std = TURBO
    sigmas = ideogram4_sigmas(steps, width, height, mu, std)
    schedule = [3.0 if 0.0 < float(s) <= 0.3 else 7.0 for s in sigmas[:-1]]  # CFGOverride 3 from 0.7 to 1
    noise = torch.randn((1, 128, height // 16, width // 16), generator=torch.Generator("cpu").manual_seed(seed))
    pipe = tiny_ideogram4.pipeline()
    if int8:  # the reference holds comfy-kitchen's dequantisation of the int8 files
        from test_int8_quant import quantise_int8

        for which in ("transformer", "unconditional_transformer"):
            _, twin = quantise_int8(tiny_ideogram4.original_state(which))
            setattr(pipe, which, copy.deepcopy(getattr(pipe, which)))
            getattr(pipe, which).load_state_dict(original_to_diffusers(twin))
    with torch.no_grad():
        theirs = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_schedule=schedule,
                      mu=mu, std=std, latents=ideogram4.to_tokens(noise), max_sequence_length=1024,
                      output_type="np").images
    gap = np.abs(ours - theirs).max()
    print(f"{name}: {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    other = Executor(registry, env).run(wf.with_overrides({"98:18.noise_seed": seed + 1})).results["98:13"][0].numpy()
    assert np.abs(ours - other).max() > 0.02  # the seed matters: not vacuous
