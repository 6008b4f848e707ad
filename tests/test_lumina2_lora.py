"""Lumina 2 LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on attention (fused ``qkv`` in ComfyUI's layout), the output projection, the MLP,
the modulation, the refiners, the caption embedder and the final layer, written with diffusers/PEFT names
and with ComfyUI's original names (fused qkv: stacked ``down``, block-diagonal ``up``, the same delta). The
reference is the tiny transformer with each delta merged by hand (W + scale * up @ down), sampled the same
way; every file must agree within 1/255 (tests/flow_family_lora.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import tiny_lumina2
import tiny_models
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import (assert_lora_equals_merged, fuse, lora_root, merged_modules, module_shapes,
                              random_factors, sample)
from nodes.families import lumina2
from nodes.handles import ModelHandle

#: diffusers module -> ComfyUI's module, for the plain ones (written out here, not Kiln's table)
RENAMES = {"layers.0.attn.to_out.0": "layers.0.attention.out",
           "layers.1.feed_forward.linear_1": "layers.1.feed_forward.w1",
           "layers.0.norm1.linear": "layers.0.adaLN_modulation.1",
           "noise_refiner.0.feed_forward.linear_2": "noise_refiner.0.feed_forward.w2",
           "context_refiner.0.attn.to_out.0": "context_refiner.0.attention.out",
           "time_caption_embed.caption_embedder.1": "cap_embedder.1", "norm_out.linear_2": "final_layer.linear",
           "x_embedder": "x_embedder"}
FUSED = {"layers.1.attention.qkv": [f"layers.1.attn.to_{q}" for q in "qkv"],
         "context_refiner.0.attention.qkv": [f"context_refiner.0.attn.to_{q}" for q in "qkv"]}


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = list(RENAMES) + [m for parts in FUSED.values() for m in parts]
    return random_factors(module_shapes(tiny_lumina2.components()["transformer"], names), seed=23)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    factors = _factors()
    return lora_root(tmp_path_factory.mktemp("lumina2-lora"), "tiny-lumina2.safetensors",
                     tiny_lumina2.original_transformer(), {"peft": factors, "comfy": fuse(factors, RENAMES, FUSED)})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_lumina2

    decode = functools.partial(tiny_models.decode, tiny_lumina2.components()["vae"])
    return sample(env, model, test_lumina2._clip(), decode, steps=3, cfg=3.0, scheduler="simple", latent=(1, 16, 8, 8))


def _merged(strength: float) -> ModelHandle:
    return merged_modules(lumina2.FAMILY, tiny_lumina2.components()["transformer"], _factors(), strength)


@pytest.mark.parametrize("fmt", ["peft", "comfy"])
def test_lumina2_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, "tiny-lumina2.safetensors", f"{fmt}.safetensors",
                              lambda model: _sample(env, model), _merged)


def test_original_names_cover_every_parameter():
    net = tiny_lumina2.components()["transformer"]
    names = lumina2.FAMILY.original_names(net)
    assert names["layers.0.attn.to_k.weight"] == "layers.0.attention.qkv.weight"
    assert names["norm_out.linear_1.bias"] == "final_layer.adaLN_modulation.1.bias"
    assert names["context_refiner.0.norm1.weight"] == "context_refiner.0.attention_norm1.weight"
    assert names["layers.1.norm1.norm.weight"] == "layers.1.attention_norm1.weight"
    assert set(names) == {n for n, _ in net.named_parameters()}
