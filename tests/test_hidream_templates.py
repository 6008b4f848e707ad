"""ComfyUI's HiDream-I1 templates (comfyui-workflow-templates-json), as their editor saved them.

``hidream_i1_dev`` (ModelSamplingSD3 6, KSampler lcm/normal 28 steps cfg 1), ``hidream_i1_fast`` (shift 3,
lcm/normal 16 steps cfg 1) and ``hidream_i1_full`` (shift 3, uni_pc/simple 50 steps cfg 5): UNETLoader,
QuadrupleCLIPLoader, VAELoader, two CLIPTextEncodes, EmptySD3LatentImage. Each validates with only its
model files missing and runs unchanged on the tiny files saved under the names it asks for but for the
image size and step count; with its sampler set to euler / simple, Dev's template (shift 6) gives
HiDreamImagePipeline's picture at that shift for its prompt and seed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_hidream
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, template, template_file_errors  # noqa: F401 (fixtures)

TEMPLATES = ("hidream_i1_dev.json", "hidream_i1_fast.json", "hidream_i1_full.json")
SIZE = 64

root = models_root(tiny_hidream.make_models_folder, "hidream-templates")


def _ids(wf) -> dict[str, str]:
    """Node id by type (the positive and negative CLIPTextEncode told apart by the sampler's links)."""
    ids = {node.type: nid for nid, node in wf.nodes.items()}
    sampler = wf.nodes[ids["KSampler"]].inputs
    ids["positive"], ids["negative"] = (sampler[k].node_id for k in ("positive", "negative"))
    return ids


def _small(wf, ids: dict[str, str], **sampler):
    overrides = {f"{ids['EmptySD3LatentImage']}.width": SIZE, f"{ids['EmptySD3LatentImage']}.height": SIZE}
    overrides.update({f"{ids['KSampler']}.{k}": v for k, v in sampler.items()})
    return wf.with_overrides(overrides)


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_templates_validate_with_only_their_files_missing(registry, tmp_path, name):
    wf, files = template_file_errors(registry, template(name), tmp_path)  # no unknown node type
    assert files == {("UNETLoader", "unet_name"), ("VAELoader", "vae_name")} | {
        ("QuadrupleCLIPLoader", f"clip_name{i}") for i in range(1, 5)}
    clip = wf.nodes[_ids(wf)["QuadrupleCLIPLoader"]].inputs
    assert [clip[f"clip_name{i}"] for i in range(1, 5)] == list(tiny_hidream.TEXTS)


@pytest.mark.parametrize("name,settings", [
    (TEMPLATES[0], ("lcm", "normal", 1, 6)), (TEMPLATES[1], ("lcm", "normal", 1, 3)),
    (TEMPLATES[2], ("uni_pc", "simple", 5, 3))])
def test_the_templates_run_on_tiny_files_as_shipped(registry, env, name, settings):
    """The shipped sampler, scheduler, cfg and shift (4 steps here); a finite picture the seed changes."""
    wf = parse_document(template(name), registry)
    ids = _ids(wf)
    sampler = wf.nodes[ids["KSampler"]].inputs
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["cfg"],
            round(wf.nodes[ids["ModelSamplingSD3"]].inputs["shift"], 6)) == settings
    wf = _small(wf, ids, steps=4)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results[ids["VAEDecode"]][0].numpy()
    assert ours.shape == (1, SIZE, SIZE, 3) and np.isfinite(ours).all()
    other = Executor(registry, env).run(_small(wf, ids, seed=sampler["seed"] + 1))
    assert np.abs(ours - other.results[ids["VAEDecode"]][0].numpy()).max() > 0.02  # not vacuous


def test_dev_template_with_euler_equals_hidream_pipeline_at_its_shift(registry, env):
    from diffusers import FlowMatchEulerDiscreteScheduler

    wf = parse_document(template(TEMPLATES[0]), registry)
    ids = _ids(wf)
    seed, steps = wf.nodes[ids["KSampler"]].inputs["seed"], 3
    outcome = Executor(registry, env).run(_small(wf, ids, steps=steps, sampler_name="euler", scheduler="simple"))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results[ids["VAEDecode"]][0].numpy()
    pipe = tiny_hidream.pipeline(SIZE)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)  # the template's ModelSamplingSD3
    with torch.no_grad():
        theirs = pipe(prompt=wf.nodes[ids["positive"]].inputs["text"], height=SIZE, width=SIZE,
                      num_inference_steps=steps, sigmas=list(np.linspace(1.0, 1 / steps, steps)), guidance_scale=1.0,
                      output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images
    gap = np.abs(ours - theirs).max()
    print(f"template gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with torch.no_grad():
        at3 = pipe(prompt=wf.nodes[ids["positive"]].inputs["text"], height=SIZE, width=SIZE,
                   num_inference_steps=steps, sigmas=list(np.linspace(1.0, 1 / steps, steps)), guidance_scale=1.0,
                   output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images
    assert np.abs(ours - at3).max() > 1 / 255  # the template's shift is what is applied


@pytest.mark.parametrize("field,value,node,inputs,words", [
    ("QuadrupleCLIPLoader.clip_name4", tiny_hidream.TEXTS[2], "QuadrupleCLIPLoader",
     ("clip_name1", "clip_name2", "clip_name3", "clip_name4"), "Llama 3.1"),
    ("UNETLoader.unet_name", tiny_hidream.TEXTS[3], "UNETLoader", ("unet_name",), "load it with CLIPLoader"),
])
def test_the_template_on_wrong_files_names_the_node_and_input(registry, env, root, field, value, node, inputs,
                                                               words):
    """T5 where Llama belongs; Llama's file given to UNETLoader."""
    import shutil

    shutil.copy(root / "text_encoders" / value, root / "diffusion_models" / value)
    wf = parse_document(template(TEMPLATES[0]), registry)
    ids = _ids(wf)
    kind, key = field.split(".")
    wf = _small(wf, ids, steps=2).with_overrides({f"{ids[kind]}.{key}": value})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "failed"
    assert outcome.error.node_id == ids[node] and outcome.error.input_name in inputs, outcome.error.message
    assert words in outcome.error.message
