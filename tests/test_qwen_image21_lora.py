"""Qwen-Image 2.1 LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on a block's query, the MLP (ComfyUI's fused ``gate_up``; diffusers' ``proj``),
the patch embedder, the shared modulation, the text projection and the output projection, written
against diffusers' module names (PEFT, ``transformer.``) and against ComfyUI's layout
(``diffusion_model.``, kohya's ``lora_unet_``). The reference is independent of Kiln's LoRA code: each
delta merged by hand into the weights of its own layout (a ComfyUI-layout delta into ComfyUI's state
dict, then split by the key table tests/test_qwen_image21.py checks). Every file must agree with its
reference within 1/255, and move the image.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_qwen_image21 as tiny
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import assert_lora_equals_merged, lora_root, merged_in_layout, random_factors, sample
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint.qwen_image21_keys import original_to_diffusers
from nodes.families import qwen_image21

DIFFUSERS_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.proj", "txt_in.in_layer",
                     "modulation.1", "norm_out.linear")
COMFY_MODULES = ("transformer_blocks.0.attn.to_k", "transformer_blocks.1.img_mlp.gate_up", "img_in", "proj_out")
FORMATS = ("peft", "comfy", "kohya")
UNET = "tiny-qwen21.safetensors"


def _layout(fmt: str) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """(the weights in the LoRA's layout, the modules its factors touch)."""
    if fmt == "peft":
        return dict(tiny.components()["transformer"].state_dict()), DIFFUSERS_MODULES
    return tiny.original_state(), COMFY_MODULES


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights, modules = _layout(fmt)
    return random_factors([(m, tuple(weights[m + ".weight"].shape)) for m in modules], seed=43)


@pytest.mark.parametrize("fmt", ["peft", "comfy"])
def test_the_modules_exist_in_the_tiny_model(fmt):
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    weights, modules = _layout(fmt)
    assert all(m + ".weight" in weights for m in modules)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny.make_models_folder(tmp_path_factory.mktemp("qwen21-lora"))
    return lora_root(root, UNET, tiny.original_state(), {fmt: _factors(fmt) for fmt in FORMATS})


def _sample(env, model) -> torch.Tensor:
    (clip,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl_8b.safetensors", type="qwen_image")
    (vae,) = call(loaders.vae_loader, env, vae_name="tiny-qwen_image_2.1_vae.safetensors")
    return sample(env, model, clip, vae.decode, steps=3, cfg=2.0, scheduler="simple", latent=(1, 64, 4, 4))


@pytest.mark.parametrize("fmt", FORMATS)
def test_qwen_image21_lora_equals_the_merged_weights(env, fmt):
    merged = lambda strength: merged_in_layout(  # noqa: E731
        qwen_image21.FAMILY, tiny.components()["transformer"], _layout(fmt)[0], _factors(fmt), strength,
        None if fmt == "peft" else original_to_diffusers)
    assert_lora_equals_merged(env, UNET, f"{fmt}.safetensors", lambda model: _sample(env, model), merged)
