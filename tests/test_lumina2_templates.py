"""ComfyUI's NetaYume Lumina template (comfyui-workflow-templates-json), as its editor saved it.

``image_netayume_lumina_t2i`` loads one all-in-one file through CheckpointLoaderSimple
(NetaYumev35_pretrained_all_in_one.safetensors), sets the shift with ModelSamplingAuraFlow 4, writes both
prompts as a system prompt + `` <Prompt Start> `` + the user's words with StringConcatenate (the negative in a
subgraph inside its subgraph), and samples with KSampler res_multistep / simple, 30 steps, cfg 4 on an
EmptySD3LatentImage. It validates with only its model file missing and runs unchanged on the tiny all-in-one
file saved under its name (64x64); with its sampler set to euler it gives Lumina2Pipeline's picture (the
template's system prompt, its negative as written, shift 4, plain CFG).
"""
from __future__ import annotations

import numpy as np
import torch

import tiny_lumina2
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, run, template, template_file_errors  # noqa: F401 (fixtures)

NAME = tiny_lumina2.NETAYUME
SIZE = 64

root = models_root(tiny_lumina2.make_models_folder, "lumina2-templates")


def _workflow(registry, **overrides):
    wf = parse_document(template(NAME), registry)
    return wf.with_overrides({"48:31.width": SIZE, "48:31.height": SIZE, **overrides})


def test_template_validates_with_only_its_file_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, template(NAME), tmp_path)  # no unknown node type
    assert len(files) == 1 and files <= {("CheckpointLoader", "ckpt_name"), ("CheckpointLoaderSimple", "ckpt_name")}
    assert wf.nodes["48:34"].inputs["ckpt_name"] == "NetaYumev35_pretrained_all_in_one.safetensors"
    assert wf.nodes["48:33"].inputs["sampler_name"] == "res_multistep"


def test_template_runs_on_the_tiny_all_in_one_file_and_with_euler_equals_lumina2_pipeline(registry, env):
    shipped = _workflow(registry)
    sampler = shipped.nodes["48:33"].inputs
    assert (sampler["steps"], sampler["cfg"], sampler["scheduler"]) == (30, 4, "simple")
    assert shipped.nodes["48:32"].type == "ModelSamplingAuraFlow" and shipped.nodes["48:32"].inputs["shift"] == 4
    as_shipped = run(registry, env, shipped).results["48:36"][0].numpy()
    assert as_shipped.shape == (1, SIZE, SIZE, 3) and np.isfinite(as_shipped).all()

    euler = run(registry, env, _workflow(registry, **{"48:33.sampler_name": "euler"})).results["48:36"][0].numpy()
    system = shipped.nodes["48:52"].inputs["value"]
    negative = shipped.nodes["48:35:41"].inputs["value"] + shipped.nodes["48:35:42"].inputs["value"]
    prompt = shipped.nodes["48:51"].inputs["value"]
    tokens = len(tiny_lumina2.components()["tokenizer"](system + prompt).input_ids)
    assert system.endswith(" <Prompt Start> ") and tokens < 512  # the pipeline cuts nothing at 512
    pipe = tiny_lumina2.pipeline()
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=4.0)
    with torch.no_grad():
        theirs = pipe(prompt=prompt, negative_prompt=negative, system_prompt=system[: -len(" <Prompt Start> ")],
                      height=SIZE, width=SIZE, num_inference_steps=sampler["steps"], guidance_scale=sampler["cfg"],
                      cfg_normalization=False, cfg_trunc_ratio=1.0, max_sequence_length=512, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(sampler["seed"])).images
    gap = np.abs(euler - theirs).max()
    print(f"{NAME} (euler): {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    assert np.abs(as_shipped - euler).max() > 1 / 255  # res_multistep is not euler: the template's sampler ran
    other = run(registry, env, _workflow(registry, **{"48:33.sampler_name": "euler",
                                                      "48:33.seed": sampler["seed"] + 1}))
    assert np.abs(euler - other.results["48:36"][0].numpy()).max() > 0.02  # the seed matters: not vacuous
