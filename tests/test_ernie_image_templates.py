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


def test_the_turbo_template_as_shipped_enhances_its_prompt_with_textgenerate(registry, env):
    """The enhancer on, as the template ships: TextGenerate runs the prompt enhancer (a Ministral 3 with its
    own head, CLIPLoader type flux2) on the template's Mistral-format instruction (its own <s>, system and
    [INST] turns, the prompt and size filled in by StringReplace), seeded sampling; the switch passes the
    written prompt on and the picture is ErnieImagePipeline's for it."""
    wf = parse_document(template("image_ernie_image_turbo.json"), registry).with_overrides({
        "88:71.width": SIZE, "88:71.height": SIZE, "88:95.max_length": 12})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    enhanced = outcome.results["88:95"][0]
    assert enhanced and enhanced != _prompt(wf)
    assert outcome.results["88:103"][0] == enhanced  # the switch's output, previewed
    with torch.no_grad():
        theirs = tiny_ernie.pipeline()(prompt=enhanced, height=SIZE, width=SIZE, num_inference_steps=8,
                                       guidance_scale=1.0, output_type="np", use_pe=False,
                                       generator=torch.Generator("cpu").manual_seed(wf.nodes["88:70"].inputs["seed"])
                                       ).images
    assert np.abs(outcome.results["88:65"][0].numpy() - theirs).max() <= 1 / 255


def test_textgenerate_greedy_on_the_prompt_enhancer_equals_transformers_generate(registry, env):
    """Greedy decoding ("off") on the enhancer: the ids of the template's instruction (taken as written: it
    starts with <s>) continued as Ministral3ForCausalLM.generate(do_sample=False) continues them."""
    from nodes.text_lm import KINDS, prompt_ids

    wf = parse_document(template("image_ernie_image_turbo.json"), registry).with_overrides({
        "88:71.width": SIZE, "88:71.height": SIZE, "88:95.max_length": 10, "88:95.sampling_mode": "off"})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    instruction = outcome.results["88:102"][0]
    assert instruction.startswith("<s>[SYSTEM_PROMPT]") and '"width": 1024' in instruction
    tok = tiny_ernie.tokenizer(bos=False)
    ids = prompt_ids(tok, instruction, KINDS["ministral3"].empty)
    assert ids[0] == 1 and ids[1] != 1  # one <s>: the instruction's own
    with torch.no_grad():
        out = tiny_ernie.prompt_enhancer().generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                                    eos_token_id=2, pad_token_id=11)[0, len(ids):].tolist()
    written = [i for i in out if i >= 12]  # control tokens are not text
    assert written and outcome.results["88:95"][0] == tok.decode(written).strip()
