"""ComfyUI's FLUX.3 [klein] text-to-image templates (comfyui-workflow-templates-json), as its editor saved them.

``image_flux3_klein_t2i`` (base: 50 steps, cfg 3.5, negative "") and ``image_flux3_klein_distilled_t2i``
(16 steps, cfg 1) parse; beside the subgraph that makes the picture they hold a layout-prompt helper
(CreateBoundingBoxes -> Flux3LayoutPrompt -> PreviewAny, not upstream of SaveImage), whose two nodes Kiln
does not have. With that helper taken out, the prompt-upsampler switch off and its TextGenerate (the
Qwen3.5 upsampler) taken out, and the ResolutionSelector's size replaced by 64x64, the rest of each graph
runs unchanged on the tiny files (UNETLoader, CLIPLoader type flux3, VAELoader, CLIPTextEncode,
EmptyFlux2LatentImage, KSampler euler/simple at the template's seed, steps and cfg, VAEDecode, SaveImage)
and gives the modular pipeline's picture for the template's prompt within 1/255.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux3
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, save_state, template  # noqa: F401 (fixtures)

SIZE = 64
#: (template, the tiny transformer file's stem, distilled, the layout helper's node ids).
TEMPLATES = [("image_flux3_klein_t2i.json", "flux3-klein-tiny", False, ("25", "26", "27")),
             ("image_flux3_klein_distilled_t2i.json", "flux3-klein-distilled-tiny", True, ("23", "24", "25"))]


def _make(folder: Path) -> Path:
    """The tiny files, and each transformer as an int8 / int8_convrot file (what the templates load:
    ``flux3-image-klein*-int8-convrot.safetensors``), made by comfy-kitchen as ComfyUI's are."""
    from test_int8_quant import quantise_int8

    root = tiny_flux3.make_models_folder(folder)
    for stem, distilled in (("flux3-klein-tiny", False), ("flux3-klein-distilled-tiny", True)):
        int8, _ = quantise_int8(tiny_flux3.original_state(distilled), "model.diffusion_model.")
        save_state(root / "diffusion_models" / f"{stem}-int8-convrot.safetensors", int8)
    return root


root = models_root(_make, "flux3-templates")


def _runnable(registry, name: str, unet: str, helper: tuple[str, ...]) -> object:
    wf = copy.deepcopy(parse_document(template(name), registry))
    assert {wf.nodes[k].type for k in helper} == {"CreateBoundingBoxes", "Flux3LayoutPrompt", "PreviewAny"}
    assert wf.nodes["18:11"].type == "TextGenerate" and wf.nodes["18:16"].type == "ComfySwitchNode"
    for k in (*helper, "18:11", "18:12", "18:14"):  # the layout helper; the upsampler, its CLIP and system prompt
        del wf.nodes[k]
    wf.nodes["18:16"].inputs["on_true"] = wf.nodes["18:16"].inputs["on_false"]
    wf.nodes["18:6"].inputs["width"] = wf.nodes["18:6"].inputs["height"] = SIZE
    del wf.nodes["19"]  # the ResolutionSelector, now unused
    return wf.with_overrides({"18:16.switch": False, "18:1.unet_name": unet,
                              "18:2.clip_name": "qwen3vl_4b-tiny.safetensors",
                              "18:3.vae_name": "flux2-vae-tiny.safetensors"})


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("name,stem,distilled,helper", TEMPLATES)
def test_klein_templates_run_on_tiny_files_and_equal_the_modular_pipeline(registry, env, name, stem, distilled,
                                                                         helper, int8):
    """``int8``: the transformer as the templates ship it (int8 / int8_convrot layers); the pipeline then
    holds comfy-kitchen's dequantisation of the same file."""
    wf = _runnable(registry, name, f"{stem}{'-int8-convrot' if int8 else ''}.safetensors", helper)
    sampler = wf.nodes["18:7"].inputs
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == \
        ((16, 1) if distilled else (50, 3.5)) + ("euler", "simple")
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["18:8"][0].numpy()
    pipe = tiny_flux3.pipeline(distilled, sampler["cfg"])
    kwargs = dict(prompt=wf.nodes["18:17"].inputs["value"], height=SIZE, width=SIZE,
                  num_inference_steps=sampler["steps"], output_type="pt", output="images")
    if int8:
        from test_int8_quant import quantise_int8

        from nodes.checkpoint.flux3_keys import original_to_diffusers

        _, twin = quantise_int8(tiny_flux3.original_state(distilled))
        transformer = copy.deepcopy(pipe.transformer)
        transformer.load_state_dict(original_to_diffusers(twin))
        with torch.no_grad():  # the float model's picture: the quantisation must show, or the test says nothing
            plain = pipe(**kwargs, generator=torch.Generator().manual_seed(sampler["seed"])).permute(0, 2, 3, 1)
        print(f"int8 against the float weights: {np.abs(ours - plain.numpy()).max() * 255:.2f}/255")
        assert np.abs(ours - plain.numpy()).max() > 1 / 255
        pipe.update_components(transformer=transformer)
    with torch.no_grad():
        theirs = pipe(**kwargs, generator=torch.Generator().manual_seed(sampler["seed"])).permute(0, 2, 3, 1).numpy()
    gap = np.abs(ours - theirs).max()
    print(f"{name}{' (int8)' if int8 else ''}: {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    other = Executor(registry, env).run(wf.with_overrides({"18:7.seed": sampler["seed"] + 1})).results["18:8"][0]
    assert np.abs(ours - other.numpy()).max() > 0.02  # the seed matters: not vacuous
