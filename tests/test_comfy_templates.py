"""ComfyUI's own workflow templates, as its editor saved them, through Kiln's converter.

The corpus is the two versions of ``comfyui-workflow-templates`` that issue 15
names, installed from the registry by requirements-dev.txt (JSON only):
0.1.48 (134 editor files, with the SD1.5 ones: default, image2image, lora, ...)
and 0.11.97, whose JSON lives in ``comfyui-workflow-templates-json`` 0.1.123
(644 editor files, 214 of them with subgraphs). Nothing here is vendored.

Claims: every template converts; no converted node has a subgraph id (or no type)
for its type; every literal that lands on a node Kiln implements is valid there,
except where the value is a file this machine lacks (a model, an input image);
a template made only of nodes Kiln implements validates with only such errors;
and ComfyUI's SD1.5 ``default`` template runs on a tiny checkpoint and gives
diffusers' pixels.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from engine.context import Environment, Paths
from engine.executor import Executor
from engine.registry import default_registry
from engine.validate import WorkflowInvalid, validate
from engine.formats import parse_document as parse

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-")
LITERAL_ERRORS = {"value_not_in_list", "invalid_input_type", "value_smaller_than_min", "value_bigger_than_max",
                  "custom_validation_failed"}
#: (node type, input, value): values templates really hold that Kiln refuses. Each was checked to be
#: the template's own value, not a slot slip: an empty SaveImage prefix (ComfyUI takes it, Kiln asks
#: for a name) and the beta57 scheduler (a custom node's, not ComfyUI's). Every sampler name the
#: templates hold is implemented (er_sde, gradient_estimation, ...: nodes/samplers/). FIBO 2's edit
#: templates and Qwen-Image 2.1's turbo edit one link one picture into BatchImagesNode (on their prompt
#: enhancer's branch), whose first two pictures ComfyUI's schema requires too (autogrow min 2; Kiln's
#: node: tests/test_comfy_v3_inputs.py). The Anima LLLite inpainting template holds a spare ResizeImageMaskNode
#: with nothing linked in or out: ComfyUI validates only what feeds an output, Kiln every node (README, Anima LLLite).
KNOWN = {("SaveImage", "filename_prefix", ""), ("KSampler", "scheduler", "beta57"),
         ("BatchImagesNode", "images.image1", None), ("ResizeImageMaskNode", "input", None)}


def _package_dir(module: str) -> Path:
    mod = __import__(module)
    return Path(mod.__file__).parent / "templates"


def _editor_files(module: str) -> dict[str, dict]:
    out = {}
    for path in sorted(_package_dir(module).glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and "links" in doc:
            out[path.name] = doc
    return out


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict[str, dict]]:
    return {"0.1.48": _editor_files("comfyui_workflow_templates"),
            "0.11.97": _editor_files("comfyui_workflow_templates_json")}


@pytest.fixture(scope="module")
def empty_env(tmp_path_factory) -> Environment:
    return Environment(paths=Paths.under(tmp_path_factory.mktemp("data")))


def _is_missing_file(registry, error) -> bool:
    """A value naming a file (model, input image, a Painter's painting) this machine does not have: a
    folder's files offered as choices, or an upload widget's file name (Painter's ``mask`` is text)."""
    spec = registry.get(error.node_type) if error.node_type else None
    inp = spec.input(error.input_name) if spec and error.input_name else None
    names_file = inp is not None and (callable(inp.choices) or bool(inp.extra.get("image_upload")))
    return names_file and error.type in ("value_not_in_list", "custom_validation_failed")


def _known(wf, error) -> bool:
    value = wf.nodes[error.node_id].inputs.get(error.input_name) if error.node_id in wf.nodes else None
    return (error.node_type, error.input_name, value) in KNOWN


def test_the_corpus_is_both_versions(corpus):
    assert len(corpus["0.1.48"]) == 134 and len(corpus["0.11.97"]) == 644
    with_subgraphs = [n for n, d in corpus["0.11.97"].items() if (d.get("definitions") or {}).get("subgraphs")]
    assert len(with_subgraphs) == 214


def test_every_template_converts_and_every_literal_lands_where_it_belongs(registry, corpus, empty_env):
    implemented, problems = [], []
    for version, docs in corpus.items():
        for name, doc in docs.items():
            wf = parse(doc, registry)  # raises on a conversion error
            for node in wf.nodes.values():
                assert node.type and not UUID.match(node.type), f"{version}/{name}: node {node.id} type {node.type!r}"
            try:
                validate(wf, registry, empty_env)
                errors = []
            except WorkflowInvalid as exc:
                errors = exc.errors
            if not any(e.type == "unknown_node_type" for e in errors):
                implemented.append(name)
            for e in errors:
                if e.type in LITERAL_ERRORS and not _is_missing_file(registry, e) and not _known(wf, e):
                    problems.append(f"{version}/{name}: {e}")
    assert problems == []
    # The SD1.5 default template and the SDXL one are made of nodes Kiln has, as are Marigold v2's.
    assert {"default.json", "image_sdxl_simple.json"} <= set(implemented)
    assert {f"image_marigold_v2_{p}_estimation.json" for p in ("depth", "albedo", "surface_normal")} <= set(implemented)
    assert "image_chrono_edit_14B.json" in implemented  # ChronoEdit's (tests/test_wan_templates.py runs it)


def test_templates_of_implemented_nodes_fail_only_for_missing_files(registry, corpus, empty_env):
    checked, valid = 0, set()
    for version, docs in corpus.items():
        for name, doc in docs.items():
            wf = parse(doc, registry)
            if any(registry.get(n.type) is None for n in wf.nodes.values()):
                continue
            checked += 1
            try:
                validate(wf, registry, empty_env)
            except WorkflowInvalid as err:  # the checkpoints are not here
                assert all(_is_missing_file(registry, e) or _known(wf, e) for e in err.errors), \
                    (name, err.errors)
            else:
                valid.add(name)
    assert checked >= 3
    assert "basic_datatype_conversion.json" in valid  # it needs no file at all


def test_the_issue_s_three_conversion_bugs_are_gone(registry, corpus):
    default = parse(corpus["0.1.48"]["default.json"], registry)
    assert {k: v for k, v in default.nodes["3"].inputs.items() if not hasattr(v, "node_id")} == {
        "seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1}  # the legacy `true` after the seed is its mode, not the steps
    img2img = parse(corpus["0.1.48"]["image2image.json"], registry)
    loaders = [n for n in img2img.nodes.values() if n.type == "LoadImage"]
    # the upload value is not `background`, which gets ComfyUI's behaviour (stored colours)
    assert loaders and all(n.inputs == {"image": "example.png", "background": "none"} for n in loaders)
    lumina = parse(corpus["0.11.97"]["image_netayume_lumina_t2i.json"], registry)
    assert lumina.nodes["48:33"].type == "KSampler" and lumina.nodes["48:33"].inputs["sampler_name"] == "res_multistep"
    assert lumina.nodes["48:35:43"].type == "CLIPTextEncode"  # a subgraph inside a subgraph
    assert lumina.nodes["48:33"].inputs["negative"].node_id == "48:35:43"


def test_comfyui_default_template_runs_and_equals_diffusers(registry, corpus, tiny_models_dir, tmp_path):
    """ComfyUI's default text-to-image template on a tiny SD1.5 checkpoint = diffusers' pipeline."""
    from diffusers import EulerDiscreteScheduler

    from nodes.runtime.models import ModelManager

    env = Environment(paths=Paths.under(tmp_path / "data", models=tiny_models_dir), models=ModelManager(device="cpu"))
    try:
        wf = parse(corpus["0.1.48"]["default.json"], registry).with_overrides(
            {"4.ckpt_name": tiny_models.checkpoint_name("sd1"), "5.width": 64, "5.height": 64, "3.steps": 4})
        outcome = Executor(registry, env).run(wf)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        ours = outcome.results["8"][0].numpy()
        saved = outcome.outputs["9"]["images"][0]
        assert env.paths.output.resolve(saved["filename"], saved.get("subfolder", "")).is_file()
    finally:
        env.models.unload_all(collect=False)
    positive, negative = wf.nodes["6"].inputs["text"], wf.nodes["7"].inputs["text"]
    pipe = tiny_models.pipeline("sd1")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = pipe(prompt=positive, negative_prompt=negative, height=64, width=64, num_inference_steps=4,
                     guidance_scale=8.0, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(156680208700286)).images
    assert ours.shape == reference.shape == (1, 64, 64, 3)
    assert np.abs(ours - reference).max() <= 1 / 255 and ours.std() > 0.01


def test_comfyui_lora_template_runs_and_equals_diffusers_fused_lora(registry, corpus, tiny_models_dir, tmp_path):
    """ComfyUI's `lora` template: a bypassed LoraLoader (its MODEL and CLIP pass through by type)
    before an active one, dpmpp_2m on karras. On a tiny SD1.5 checkpoint and a LoRA saved as PEFT
    writes it, it equals diffusers' pipeline with the LoRA fused at the same strength. The prompts
    are replaced by plain text (the template's use ComfyUI's weighting syntax, which diffusers lacks)."""
    from diffusers import DPMSolverMultistepScheduler
    from safetensors.torch import save_file

    from nodes.runtime.models import ModelManager
    from test_lora import _adapted, _peft_state

    lora_dir = Path(tiny_models_dir) / "loras"
    lora_dir.mkdir(exist_ok=True)
    lora_path = lora_dir / "template-sd1-peft.safetensors"
    save_file(_peft_state(_adapted("sd1")), str(lora_path))
    wf = parse(corpus["0.1.48"]["lora.json"], registry)
    assert "13" not in wf.nodes and wf.nodes["11"].inputs["model"].node_id == "4"  # 13 bypassed
    assert (wf.nodes["11"].inputs["strength_model"], wf.nodes["11"].inputs["strength_clip"]) == (0.75, 1)
    positive, negative = "a teddy bear among flowers", "blurry"
    wf = wf.with_overrides({"4.ckpt_name": tiny_models.checkpoint_name("sd1"), "11.lora_name": lora_path.name,
                            "11.strength_clip": 0.75, "5.width": 64, "5.height": 64, "3.steps": 4,
                            "6.text": positive, "7.text": negative})
    env = Environment(paths=Paths.under(tmp_path / "data", models=tiny_models_dir), models=ModelManager(device="cpu"))
    try:
        outcome = Executor(registry, env).run(wf)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        ours = outcome.results["8"][0].numpy()
    finally:
        env.models.unload_all(collect=False)
    pipe = tiny_models.pipeline("sd1", parts=tiny_models.fresh_components("sd1"))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2, use_karras_sigmas=True)
    pipe.load_lora_weights(str(lora_dir), weight_name=lora_path.name)
    pipe.fuse_lora(lora_scale=0.75)
    reference = pipe(prompt=positive, negative_prompt=negative, height=64, width=64, num_inference_steps=4,
                     guidance_scale=7.0, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(261660645921551)).images
    assert ours.shape == reference.shape == (1, 64, 64, 3)
    assert np.abs(ours - reference).max() <= 1 / 255 and ours.std() > 0.01


@pytest.mark.parametrize("name,mask_node", [("inpaint_example.json", "20"), ("inpaint_model_outpainting.json", "30")])
def test_comfyui_inpaint_templates_run_on_a_tiny_inpainting_checkpoint(registry, corpus, tmp_path, name, mask_node):
    """ComfyUI's inpainting templates (VAEEncodeForInpaint into KSampler at denoise 1) on a tiny
    9-channel SD1 inpainting checkpoint (scaled to their minimum, ~100 px): outside the grown noise mask the sampled
    latent is VAEEncodeForInpaint's exactly, inside it was repainted."""
    from PIL import Image

    from nodes.runtime.models import ModelManager
    from nodes.sample_image import draw_landscape

    models = tmp_path / "models"
    tiny_models.save_single_file("sd1-inpaint", models / "checkpoints" / "tiny-sd1-inpaint.safetensors",
                                 parts=tiny_models.components("sd1-inpaint"))
    env = Environment(paths=Paths.under(tmp_path / "data", models=models), models=ModelManager(device="cpu"))
    rgba = np.array(draw_landscape(64, 64).convert("RGBA"))
    rgba[16:40, 24:48, 3] = 0  # transparent: to repaint
    wf = parse(corpus["0.1.48"][name], registry)
    image_name = wf.nodes["20"].inputs["image"]
    Image.fromarray(rgba).save(env.paths.input.root / image_name)
    scale_node = "33" if "33" in wf.nodes else "38"
    overrides = {"29.ckpt_name": "tiny-sd1-inpaint.safetensors", f"{scale_node}.megapixels": 0.01,  # the minimum: about 100x100
                 "3.steps": 4}
    if name == "inpaint_model_outpainting.json":
        overrides.update({"30.left": 8, "30.top": 8, "30.right": 8, "30.bottom": 16})
    try:
        outcome = Executor(registry, env).run(wf.with_overrides(overrides))
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
    finally:
        env.models.unload_all(collect=False)
    encoded = outcome.results["26"][0]
    sampled = outcome.results["3"][0]["samples"]
    keep = torch.nn.functional.interpolate(encoded["noise_mask"], size=sampled.shape[2:], mode="bilinear") == 0
    keep = keep.expand_as(sampled)
    assert bool(keep.any()) and bool((~keep).any())
    assert torch.equal(sampled[keep], encoded["samples"][keep])
    assert float((sampled[~keep] - encoded["samples"][~keep]).abs().mean()) > 0.05
    image = outcome.results["8"][0]
    assert image.shape[1:] == (encoded["samples"].shape[2] * 8, encoded["samples"].shape[3] * 8, 3)
