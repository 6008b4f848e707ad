"""ComfyUI's Ovis-Image template (comfyui-workflow-templates-json), as its editor saved it.

``image_ovis_text_to_image`` (a subgraph: UNETLoader, CLIPLoader type ovis, VAELoader,
ModelSamplingAuraFlow 3, EmptySD3LatentImage, KSampler euler/simple 20 steps cfg 5 with an empty
negative prompt) validates with only its model files missing; on the tiny files saved under the names it
asks for (ovis_image_bf16, ovis_2.5, ae) it runs unchanged but for the image size and gives
OvisImagePipeline's picture for its prompt, seed and steps.
"""
from __future__ import annotations

import numpy as np
import pytest

import tiny_ovis
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, template, template_file_errors  # noqa: F401 (fixtures)
from test_ovis import reference

NAME = "image_ovis_text_to_image.json"
SIZE = 64

root = models_root(tiny_ovis.make_models_folder, "ovis-templates")


def test_the_template_validates_with_only_its_files_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, template(NAME), tmp_path)  # no unknown node type
    assert files == {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name")}
    clip = next(n for n in wf.nodes.values() if n.type == "CLIPLoader")
    assert clip.inputs["type"] == "ovis" and clip.inputs["clip_name"] == tiny_ovis.TEXT


def test_the_template_runs_on_tiny_files_and_equals_ovis_pipeline(registry, env):
    wf = parse_document(template(NAME), registry).with_overrides({"57:41.width": SIZE, "57:41.height": SIZE})
    sampler = wf.nodes["57:44"].inputs
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["cfg"]) == ("euler", "simple", 5)
    assert wf.nodes["57:47"].inputs["shift"] == 3 and wf.nodes["57:49"].inputs["text"] == ""
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["57:43"][0].numpy()
    theirs = reference(wf.nodes["57:45"].inputs["text"], "", sampler["seed"], sampler["steps"], 5.0)
    gap = np.abs(ours - theirs).max()
    print(f"template gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    other = Executor(registry, env).run(wf.with_overrides({"57:44.seed": sampler["seed"] + 1}))
    assert np.abs(ours - other.results["57:43"][0].numpy()).max() > 0.02  # the seed matters: not vacuous


@pytest.mark.parametrize("override,node,inputs,words", [
    ({"57:39.clip_name": "tiny-t5xxl.safetensors"}, "57:39", ("clip_name",), "'ovis' needs Qwen3"),
    ({"57:46.unet_name": "tiny-flux.safetensors"}, "57:44", ("positive", "negative"), "FLUX CLIP"),
])
def test_the_template_on_wrong_files_names_the_node_and_input(registry, env, override, node, inputs, words):
    """A T5 under CLIPLoader type ovis; a FLUX transformer sampled with Ovis's conditioning (FLUX's check
    names the first conditioning it reads, the negative here)."""
    wf = parse_document(template(NAME), registry).with_overrides({"57:41.width": SIZE, "57:41.height": SIZE,
                                                                  "57:44.steps": 2, **override})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "failed"
    assert outcome.error.node_id == node and outcome.error.input_name in inputs, outcome.error.message
    assert words in outcome.error.message
