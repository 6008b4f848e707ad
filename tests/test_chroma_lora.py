"""Chroma LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on attention (fused in the original layout), MLP, the single blocks'
fused ``linear1``, the approximator and the final layer, written as diffusers/PEFT names, as
ComfyUI's original-layout names (fused modules: stacked ``down``, block-diagonal ``up``, the same
delta) and as kohya's. The reference is the tiny transformer with each delta merged by hand
(W + scale * up @ down), sampled the same way; every file must agree within 1/255.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import tiny_chroma
import tiny_models
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import (assert_lora_equals_merged, fuse, lora_root, merged_modules, module_shapes,
                              random_factors, sample)
from nodes.families import chroma
from nodes.handles import ModelHandle

#: diffusers module -> original module, for the plain ones (written out here, not Kiln's table)
RENAMES = {"transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj",
           "transformer_blocks.0.ff.net.0.proj": "double_blocks.0.img_mlp.0",
           "transformer_blocks.0.ff_context.net.2": "double_blocks.0.txt_mlp.2",
           "single_transformer_blocks.0.proj_out": "single_blocks.0.linear2",
           "distilled_guidance_layer.layers.0.linear_1": "distilled_guidance_layer.layers.0.in_layer",
           "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
           "proj_out": "final_layer.linear", "x_embedder": "img_in"}
FUSED = {"double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{q}" for q in "qkv"],
         "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{q}_proj" for q in "qkv"],
         "single_blocks.0.linear1": [f"single_transformer_blocks.0.attn.to_{q}" for q in "qkv"]
         + ["single_transformer_blocks.0.proj_mlp"]}


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module -> (down [r, in], up [out, r]), seeded."""
    names = list(RENAMES) + [m for parts in FUSED.values() for m in parts]
    return random_factors(module_shapes(tiny_chroma.components()["transformer"], names), seed=21)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    factors = _factors()
    original = fuse(factors, RENAMES, FUSED)
    return lora_root(tmp_path_factory.mktemp("chroma-lora"), "tiny-chroma.safetensors",
                     tiny_chroma.original_transformer(), {"peft": factors, "comfy": original, "kohya": original})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_chroma

    decode = functools.partial(tiny_models.decode, tiny_chroma.components()["vae"])
    return sample(env, model, test_chroma._clip(), decode, steps=4, cfg=4.0, scheduler="normal", latent=(1, 16, 8, 8))


def _merged(strength: float) -> ModelHandle:
    return merged_modules(chroma.FAMILY, tiny_chroma.components()["transformer"], _factors(), strength)


@pytest.mark.parametrize("fmt", ["peft", "comfy", "kohya"])
def test_chroma_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, "tiny-chroma.safetensors", f"{fmt}.safetensors", lambda model: _sample(env, model),
                              _merged)


def test_original_names_cover_every_parameter():
    names = chroma.FAMILY.original_names(tiny_chroma.components()["transformer"])
    assert names["transformer_blocks.0.attn.to_k.weight"] == "double_blocks.0.img_attn.qkv.weight"
    assert names["distilled_guidance_layer.norms.1.weight"] == "distilled_guidance_layer.norms.1.scale"
    assert set(names) == {n for n, _ in tiny_chroma.components()["transformer"].named_parameters()}
