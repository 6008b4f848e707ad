"""ComfyUI's image_qwen_image_instantx_inpainting_controlnet.json template, run from its editor file
through Kiln's converter on the tiny Qwen-Image's split files and a tiny InstantX Inpainting ControlNet
saved under the template's own file name (only file names, sizes, steps and seed are overridden; the
mask's blur radius is scaled with the image, 31 of the template's 1536 pixels to 1 of 64).

The template loads an image whose alpha is the mask, grows and blurs the mask (a subgraph), applies the
ControlNet with ControlNetInpaintingAliMamaApply, samples the VAE-encoded image under SetLatentNoiseMask
at ModelSamplingAuraFlow's shift 3.1 (euler, simple, cfg 2.5) and pastes the result back with
ImageCompositeMasked. With the whole image masked, the noise mask keeps nothing of the image and the
run is QwenImageControlNetInpaintPipeline's at the same fixed shift (the pipeline has no noise mask):
the two must agree within 1/255. With part of the image masked, the kept pixels come back unchanged.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_qwen_image
from engine.executor import Executor
from engine.formats import parse_document
from engine.registry import default_registry
from flow_family_files import quiet_pipeline
from node_call import environment_over
from test_qwen_image_controlnet import at_mean, photo, tiny_controlnet
from test_qwen_image_loading import SPLIT, _of_type

TEMPLATE = "image_qwen_image_instantx_inpainting_controlnet.json"
SIZE, STEPS, SEED, CFG = 64, 4, 11, 2.5
INPUT = "qwen-inpaint-input.png"


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture(scope="module")
def qwen_root(tmp_path_factory):
    from safetensors.torch import save_file

    root = tiny_qwen_image.make_models_folder(tmp_path_factory.mktemp("qwen-cn-template"))
    (root / "controlnet").mkdir(exist_ok=True)
    state = {k: v.contiguous() for k, v in tiny_controlnet(True).state_dict().items()}
    save_file(state, str(root / "controlnet" / "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors"))
    return root


@pytest.fixture()
def env(qwen_root, tmp_path):
    yield from environment_over(qwen_root, tmp_path)


def _write_input(env, alpha: np.ndarray) -> None:
    """The photo as an RGBA PNG whose alpha is 1 - mask (how ComfyUI's mask editor saves it)."""
    rgb = np.clip(np.rint(photo()[0].numpy() * 255), 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.rint(alpha * 255).astype(np.uint8)[..., None]], axis=-1)
    env.paths.input.root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(env.paths.input.root / INPUT)


def _run(registry, env, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(the sampled image, the composited one) of the template with the tiny files."""
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    wf = parse_document(json.loads((folder / TEMPLATE).read_text(encoding="utf-8")), registry)
    (unet,), (clip,), (vae,), (load,) = (_of_type(wf, t) for t in ("UNETLoader", "CLIPLoader", "VAELoader",
                                                                  "LoadImage"))
    (scale,), (sampler,), (apply,) = (_of_type(wf, t) for t in ("ImageScaleToMaxDimension", "KSampler",
                                                                 "ControlNetInpaintingAliMamaApply"))
    assert round(float(_of_type(wf, "ModelSamplingAuraFlow")[0].inputs["shift"]), 4) == 3.1
    assert sampler.inputs["sampler_name"] == "euler" and sampler.inputs["scheduler"] == "simple"
    assert float(sampler.inputs["cfg"]) == CFG and _of_type(wf, "SetLatentNoiseMask")
    unet.inputs["unet_name"], clip.inputs["clip_name"], vae.inputs["vae_name"] = SPLIT["unet"], SPLIT["clip"], \
        SPLIT["vae"]
    load.inputs["image"] = INPUT
    scale.inputs["largest_size"] = SIZE
    (blur,) = _of_type(wf, "ImageBlur")  # ComfyUI's kernel spans its whole width: 31 of 1536 pixels is 1 of 64
    assert int(blur.inputs["blur_radius"]) == 31
    blur.inputs["blur_radius"] = 1
    sampler.inputs.update(seed=SEED, steps=STEPS)
    apply.inputs["strength"] = strength
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    (composite,) = _of_type(wf, "ImageCompositeMasked")
    sampled = outcome.results[composite.inputs["source"].node_id][0].numpy()
    pasted = outcome.results[composite.id][0].numpy()
    return sampled, pasted


def _prompts(registry) -> tuple[str, str]:
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    wf = parse_document(json.loads((folder / TEMPLATE).read_text(encoding="utf-8")), registry)
    (apply,) = _of_type(wf, "ControlNetInpaintingAliMamaApply")
    pos, neg = (wf.nodes[apply.inputs[k].node_id].inputs["text"] for k in ("positive", "negative"))
    return pos, neg


def test_template_with_the_whole_image_masked_equals_the_inpaint_pipeline(registry, env, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageControlNetInpaintPipeline

    _write_input(env, np.zeros((SIZE, SIZE), dtype=np.float32))  # alpha 0: all of it repainted
    ours, pasted = _run(registry, env)
    assert np.abs(ours - pasted).max() <= 1e-5  # the blurred mask is 1 everywhere, to rounding
    at_mean(monkeypatch)
    pipe = quiet_pipeline(QwenImageControlNetInpaintPipeline, tiny_qwen_image.components(),
                          controlnet=tiny_controlnet(True))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.1,
                                                                 use_dynamic_shifting=False, shift_terminal=None)
    prompt, negative = _prompts(registry)
    with torch.no_grad():
        theirs = pipe(prompt=prompt, negative_prompt=negative, control_image=photo().movedim(-1, 1) * 2 - 1,
                      control_mask=torch.ones(1, 1, SIZE, SIZE), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      true_cfg_scale=CFG, output_type="np", generator=torch.Generator().manual_seed(SEED)).images
    gap = float(np.abs(ours - theirs).max())
    print(f"inpainting template gap {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    off, _ = _run(registry, env, strength=0.0)
    assert np.abs(ours - off).max() > 0.02  # the ControlNet moves the image


def test_template_with_part_masked_keeps_the_rest_and_the_controlnet_matters(registry, env):
    alpha = np.ones((SIZE, SIZE), dtype=np.float32)
    alpha[16:48, 8:40] = 0.0
    _write_input(env, alpha)
    sampled, pasted = _run(registry, env)
    loaded = np.asarray(Image.open(env.paths.input.root / INPUT).convert("RGB"), dtype=np.float32) / 255.0
    far = np.ones((SIZE, SIZE), dtype=bool)  # beyond the blur's reach of the masked square
    far[16 - 2:48 + 2, 8 - 2:40 + 2] = False
    assert np.abs(pasted[0][far] - loaded[far]).max() <= 1e-6  # kept pixels come back unchanged
    assert np.abs(pasted[0][24:40, 16:32] - loaded[24:40, 16:32]).mean() > 0.02  # the hole is repainted
    off, _ = _run(registry, env, strength=0.0)
    assert np.abs(sampled - off).max() > 0.02  # the ControlNet moves the image
