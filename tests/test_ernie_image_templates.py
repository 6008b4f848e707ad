"""ComfyUI's ERNIE-Image templates (comfyui-workflow-templates-json), as its editor saved them.

``image_ernie_image`` (20 steps, cfg 4, an empty negative) and ``image_ernie_image_turbo`` (8 steps, cfg 1, a
ConditioningZeroOut negative) validate with only their model files missing. On the tiny files saved under
the names they ask for (ernie-image(-turbo).safetensors, ministral-3-3b.safetensors,
ernie-image-prompt-enhancer.safetensors, flux2-vae.safetensors), with the prompt-enhancer switch off, they
run as saved and give ErnieImagePipeline's picture (use_pe False) for the template's prompt.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_ernie
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, save_state, template, template_file_errors  # noqa: F401 (fixtures)

SIZE = 64
#: template -> (its UNETLoader's file, steps, cfg, the enhancer switch's node)
TEMPLATES = {"image_ernie_image.json": ("ernie-image.safetensors", 20, 4.0, "88:76"),
             "image_ernie_image_turbo.json": ("ernie-image-turbo.safetensors", 8, 1.0, "88:96")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The tiny files under the templates' names (one transformer serves both)."""
    root = tiny_ernie.make_models_folder(tmp_path_factory.mktemp("ernie-templates"))
    for name, *_ in TEMPLATES.values():
        (root / "diffusion_models" / name).write_bytes((root / "diffusion_models" / "tiny-ernie.safetensors").read_bytes())
    text = root / "text_encoders"
    (text / "ministral-3-3b.safetensors").write_bytes((text / "tiny-ministral-3-3b.safetensors").read_bytes())
    save_state(text / "ernie-image-prompt-enhancer.safetensors", tiny_ernie.comfy_pe_state())
    (root / "vae" / "flux2-vae.safetensors").write_bytes((root / "vae" / "tiny-flux2-vae.safetensors").read_bytes())
    return root


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_validate_with_only_their_files_missing(registry, name, tmp_path):
    wf, files = template_file_errors(registry, template(name), tmp_path)  # no unknown node type
    assert files and files <= {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name")}
    assert {n.inputs["type"] for n in wf.nodes.values() if n.type == "CLIPLoader"} == {"flux2"}


def _prompt(wf) -> str:
    """The template's own prompt: the multiline primitive the switch passes on when the enhancer is off."""
    switch = next(n for n in wf.nodes.values() if n.type == "ComfySwitchNode")
    return wf.nodes[switch.inputs["on_false"].node_id].inputs["value"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_with_the_enhancer_off_run_and_equal_ernie_pipeline(registry, env, name):
    unet, steps, cfg, switch = TEMPLATES[name]
    wf = parse_document(template(name), registry)
    assert wf.nodes[switch].inputs["value"] is True  # as shipped: the enhancer on
    assert wf.nodes["88:66"].inputs["unet_name"] == unet and wf.nodes["88:70"].inputs["steps"] == steps
    wf = wf.with_overrides({f"{switch}.value": False, "88:71.width": SIZE, "88:71.height": SIZE})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["88:65"][0].numpy()
    seed = wf.nodes["88:70"].inputs["seed"]
    with torch.no_grad():
        theirs = tiny_ernie.pipeline()(prompt=_prompt(wf), negative_prompt="", height=SIZE, width=SIZE,
                                       num_inference_steps=steps, guidance_scale=cfg, output_type="np", use_pe=False,
                                       generator=torch.Generator("cpu").manual_seed(seed)).images
    gap = np.abs(ours - theirs).max()
    print(f"{name}: {gap * 255:.4f}/255")
    assert gap <= 1 / 255, gap
    other = Executor(registry, env).run(wf.with_overrides({"88:70.seed": seed + 1})).results["88:65"][0].numpy()
    assert np.abs(ours - other).max() > 0.02  # the seed matters: not vacuous
