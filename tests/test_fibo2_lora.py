"""FIBO 2 LoRAs through UNETLoader + LoraLoaderModelOnly + KSampler.

FIBO 2's files hold diffusers' module names, so its LoRAs name them too, in the usual wrappings: PEFT's
``transformer.``, ComfyUI's ``diffusion_model.`` and kohya's ``lora_unet_`` with underscores. Random
factors on a refiner block, an injection block's cross-attention, the Perceiver, the patch embedder,
the timestep MLP and the final layer; the reference merges each delta by hand into the tiny model's
weights (independent of Kiln's LoRA code). Every file equals it within 1/255 and moves the image.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_fibo2
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import assert_lora_equals_merged, lora_root, merged_in_layout, random_factors, sample
from node_call import call
from nodes import loaders, split_loaders
from nodes.families import fibo2
from nodes.handles import ModelHandle

MODULES = ("noise_refiner.0.attention.to_q", "layers.2.cross_attention.to_k", "perceiver.layers.1.ffn.w2",
           "x_embedder", "t_embedder.mlp.0", "final_layer.linear")
FORMATS = ("peft", "comfy", "kohya")
UNET = "tiny-fibo2.safetensors"


def _factors() -> dict:
    weights = tiny_fibo2.transformer_state()
    return random_factors([(name, tuple(weights[name + ".weight"].shape)) for name in MODULES], seed=43)


def test_the_modules_exist_in_the_tiny_model():
    assert all(m + ".weight" in tiny_fibo2.transformer_state() for m in MODULES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_fibo2.make_models_folder(tmp_path_factory.mktemp("fibo2-lora"))
    return lora_root(root, UNET, tiny_fibo2.transformer_state(), {fmt: _factors() for fmt in FORMATS})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    (clip,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl_4b.safetensors", type="fibo2")
    (vae,) = call(loaders.vae_loader, env, vae_name="tiny-flux2-vae.safetensors")
    return sample(env, model, clip, vae.decode, steps=3, cfg=2.0, scheduler="simple", latent=(1, 128, 4, 4))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fibo2_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, UNET, f"{fmt}.safetensors", lambda model: _sample(env, model),
                              lambda strength: merged_in_layout(fibo2.FAMILY, tiny_fibo2.components()["transformer"],
                                                                tiny_fibo2.transformer_state(), _factors(), strength))
