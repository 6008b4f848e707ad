"""ComfyUI's Qwen-Image 2.1 templates (comfyui-workflow-templates-json), as its editor saved them.

``image_qwen_image_2_1_t2i``, ``_turbo_t2i`` and the edit templates validate with only their files
missing. With the prompt-enhance switch off (as they ship) and the TextGenerate node (a Qwen3.5 prompt
enhancer, out of scope) taken out, the text-to-image graphs run unchanged on the tiny files
(UNETLoader, CLIPLoader type qwen_image, VAELoader, QwenImage21Cache, TextEncodeQwenImage21,
EmptyLatentImage from ResolutionSelector; KSampler euler/simple cfg 1, or the turbo's ManualSigmas
through SamplerCustomAdvanced) and give QwenImage21Pipeline's picture. The edit template hands its
pictures to TextEncodeQwenImage21, which Kiln refuses by node and input (Qwen3-VL's vision tower is not
loaded yet).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tiny_qwen_image21 as tiny
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, template, template_file_errors  # noqa: F401 (fixtures)

T2I, TURBO, EDIT = ("image_qwen_image_2_1_t2i.json", "image_qwen_image_2_1_turbo_t2i.json",
                    "image_qwen_image_2_1_image_edit.json")
SIZE = 64
PROMPT = "a lighthouse on a cliff at dusk"

root = models_root(tiny.make_models_folder, "qwen21-templates")


@pytest.mark.parametrize("name", [T2I, TURBO, EDIT, "image_qwen_image_2_1_background_removal.json"])
def test_templates_validate_with_only_their_files_missing(registry, name, tmp_path):
    _, files = template_file_errors(registry, template(name), tmp_path)
    assert files and files <= {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
                               ("LoadImage", "image")}, files


def _tiny(registry, name: str) -> object:
    """The template with its (off) prompt-enhance switch rewired past TextGenerate, which is taken out with
    its CLIPLoader, on the tiny files at 64x64; its own prompt (the subgraph's first widget) passes the switch."""
    wf = copy.deepcopy(parse_document(template(name), registry))
    assert wf.nodes["459:471"].type == "TextGenerate" and wf.nodes["459:474"].type == "ComfySwitchNode"
    assert wf.nodes["459:474"].inputs["switch"] is False  # shipped with the enhancer off
    assert wf.nodes["459:474"].inputs["on_false"] == template(name)["nodes"][1]["widgets_values"][0]
    del wf.nodes["459:471"], wf.nodes["459:473"]  # TextGenerate and the Qwen3.5 file it reads
    wf.nodes["459:474"].inputs["on_true"] = wf.nodes["459:474"].inputs["on_false"]
    return wf.with_overrides({"459:451.unet_name": "tiny-qwen21.safetensors",
                              "459:453.clip_name": "tiny-qwen3vl_8b.safetensors",
                              "459:454.vae_name": "tiny-qwen_image_2.1_vae.safetensors",
                              "459:456.width": SIZE, "459:456.height": SIZE})


def _image(registry, env, wf) -> np.ndarray:
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["459:457"][0].numpy()


def test_t2i_template_runs_on_tiny_files_and_equals_the_pipeline(registry, env):
    wf = _tiny(registry, T2I).with_overrides({"459:458.steps": 4})
    sampler = wf.nodes["459:458"].inputs
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (1, "euler", "simple")
    assert sampler["seed"] == 447606998181262  # the subgraph's seed widget, not the inner default
    ours = _image(registry, env, wf)
    with torch.no_grad():
        theirs = tiny.pipeline()(prompt=wf.nodes["459:474"].inputs["on_false"], height=SIZE, width=SIZE,
                                 num_inference_steps=4, output_type="np",
                                 generator=torch.Generator("cpu").manual_seed(sampler["seed"])).images
    gap = np.abs(ours - theirs).max()
    print(f"t2i template gap {gap * 255:.4f}/255")
    assert ours.shape == theirs.shape and gap <= 1 / 255
    other = _image(registry, env, wf.with_overrides({"459:458.seed": sampler["seed"] + 1}))
    assert np.abs(ours - other).max() > 0.02  # the seed matters: not vacuous


def test_turbo_template_runs_its_manual_sigmas_and_equals_the_pipeline(registry, env):
    """The turbo's eight ManualSigmas as given (no shift): the pipeline's ``sigmas`` with an unshifted scheduler."""
    wf = _tiny(registry, TURBO)
    sigmas = [float(s) for s in wf.nodes["459:484"].inputs["sigmas"].split(",")]
    seed = wf.nodes["459:488"].inputs["noise_seed"]
    ours = _image(registry, env, wf)
    pipe = tiny.pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=False)
    with torch.no_grad():
        theirs = pipe(prompt=wf.nodes["459:474"].inputs["on_false"], height=SIZE, width=SIZE, sigmas=sigmas[:-1],
                      output_type="np",
                      generator=torch.Generator("cpu").manual_seed(seed)).images
    gap = np.abs(ours - theirs).max()
    print(f"turbo template gap {gap * 255:.4f}/255")
    assert sigmas[-1] == 0 and gap <= 1 / 255
    other = _image(registry, env, wf.with_overrides({"459:474.on_false": PROMPT}))
    assert np.abs(ours - other).max() > 0.02  # the prompt matters: not vacuous


def test_edit_template_refuses_its_pictures_by_node_and_input(registry, env):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(env.paths.input.root / name)
    wf = copy.deepcopy(parse_document(template(EDIT), registry))
    assert wf.nodes["459:484"].inputs["switch"] is False
    del wf.nodes["459:500"]
    wf.nodes["459:484"].inputs["on_true"] = PROMPT
    wf = wf.with_overrides({"459:451.unet_name": "tiny-qwen21.safetensors",
                            "459:453.clip_name": "tiny-qwen3vl_8b.safetensors",
                            "459:454.vae_name": "tiny-qwen_image_2.1_vae.safetensors",
                            "470.image": "a.png", "475.image": "b.png"})
    del wf.nodes["459:477"], wf.nodes["459:485"], wf.nodes["459:479"]
    outcome = Executor(registry, env).run(wf)
    assert outcome.status != "succeeded"
    err = outcome.error
    assert err.node_id == "459:474" and err.input_name == "images.image_1" and "vision tower" in err.message
