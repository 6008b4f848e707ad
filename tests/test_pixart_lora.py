"""PixArt LoRAs in the layouts people have, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on self- and cross-attention (fused ``qkv`` and ``kv_linear`` in PixArt's original
layout), the MLP, the caption projection and the final layer, written under diffusers/PEFT names
(``transformer.``, SimpleTuner's and diffusers' own), ComfyUI's original-layout names (``diffusion_model.``;
fused modules as stacked ``down`` and block-diagonal ``up``, the same delta) and kohya's. The reference is
the tiny transformer with each delta merged by hand (W + strength * up @ down), sampled the same way; every
file must agree within 1/255, move the image, and leave the loaded weights as they were.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import tiny_models
import tiny_pixart
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import (assert_lora_equals_merged, fuse, lora_root, merged_modules, module_shapes,
                              random_factors, sample)
from nodes.families import pixart
from nodes.handles import ModelHandle

#: diffusers module -> original module, for the plain ones (written out here, not Kiln's table)
RENAMES = {"transformer_blocks.0.attn1.to_out.0": "blocks.0.attn.proj",
           "transformer_blocks.0.attn2.to_q": "blocks.0.cross_attn.q_linear",
           "transformer_blocks.1.attn2.to_out.0": "blocks.1.cross_attn.proj",
           "transformer_blocks.0.ff.net.0.proj": "blocks.0.mlp.fc1",
           "transformer_blocks.1.ff.net.2": "blocks.1.mlp.fc2",
           "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "proj_out": "final_layer.linear"}
FUSED = {"blocks.0.attn.qkv": [f"transformer_blocks.0.attn1.to_{q}" for q in "qkv"],
         "blocks.1.cross_attn.kv_linear": ["transformer_blocks.1.attn2.to_k", "transformer_blocks.1.attn2.to_v"]}


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = list(RENAMES) + [m for parts in FUSED.values() for m in parts]
    return random_factors(module_shapes(tiny_pixart.components("sigma")["transformer"], names), seed=23)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    factors = _factors()
    original = fuse(factors, RENAMES, FUSED)
    return lora_root(tmp_path_factory.mktemp("pixart-lora"), "tiny-pixart-sigma.safetensors",
                     tiny_pixart.original_transformer("sigma"),
                     {"peft": factors, "comfy": original, "kohya": original})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_pixart

    decode = functools.partial(tiny_models.decode, tiny_pixart.components("sigma")["vae"])
    return sample(env, model, test_pixart._clip("sigma"), decode, steps=4, cfg=4.5, scheduler="normal",
                  latent=(1, 4, 8, 8))


def _merged(strength: float) -> ModelHandle:
    return merged_modules(pixart.SIGMA, tiny_pixart.components("sigma")["transformer"], _factors(), strength)


@pytest.mark.parametrize("fmt", ["peft", "comfy", "kohya"])
def test_pixart_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, "tiny-pixart-sigma.safetensors", f"{fmt}.safetensors",
                              lambda model: _sample(env, model), _merged)
