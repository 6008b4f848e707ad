"""Z-Image LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on attention (fused ``qkv`` in the original layout), the output projection,
the MLP, the refiners, the caption embedder and the final layer, written as diffusers/PEFT names, as
ComfyUI's original-layout names (fused qkv: stacked ``down``, block-diagonal ``up``, the same delta)
and as kohya's. The reference is the tiny transformer with each delta merged by hand
(W + scale * up @ down), sampled the same way; every file must agree within 1/255.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import tiny_models
import tiny_z_image
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import (assert_lora_equals_merged, fuse, lora_root, merged_modules, module_shapes,
                              random_factors, sample)
from nodes.families import z_image
from nodes.handles import ModelHandle

#: diffusers module -> original module, for the plain ones (written out here, not Kiln's table)
RENAMES = {"layers.0.attention.to_out.0": "layers.0.attention.out",
           "layers.1.feed_forward.w1": "layers.1.feed_forward.w1",
           "layers.0.adaLN_modulation.0": "layers.0.adaLN_modulation.0",
           "noise_refiner.0.feed_forward.w2": "noise_refiner.0.feed_forward.w2",
           "context_refiner.0.attention.to_out.0": "context_refiner.0.attention.out",
           "cap_embedder.1": "cap_embedder.1",
           "all_final_layer.2-1.linear": "final_layer.linear", "all_x_embedder.2-1": "x_embedder"}
FUSED = {"layers.1.attention.qkv": [f"layers.1.attention.to_{q}" for q in "qkv"],
         "noise_refiner.0.attention.qkv": [f"noise_refiner.0.attention.to_{q}" for q in "qkv"]}


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module -> (down [r, in], up [out, r]), seeded."""
    names = list(RENAMES) + [m for parts in FUSED.values() for m in parts]
    return random_factors(module_shapes(tiny_z_image.components()["transformer"], names), seed=21)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    factors = _factors()
    original = fuse(factors, RENAMES, FUSED)
    return lora_root(tmp_path_factory.mktemp("z-image-lora"), "tiny-z-image.safetensors",
                     tiny_z_image.original_transformer(), {"peft": factors, "comfy": original, "kohya": original})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_z_image

    decode = functools.partial(tiny_models.decode, tiny_z_image.components()["vae"])
    return sample(env, model, test_z_image._clip(), decode, steps=4, cfg=3.0, scheduler="simple", latent=(1, 16, 8, 8))


def _merged(strength: float) -> ModelHandle:
    return merged_modules(z_image.FAMILY, tiny_z_image.components()["transformer"], _factors(), strength)


@pytest.mark.parametrize("fmt", ["peft", "comfy", "kohya"])
def test_z_image_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, "tiny-z-image.safetensors", f"{fmt}.safetensors", lambda model: _sample(env, model),
                              _merged)


def test_original_names_cover_every_parameter():
    net = tiny_z_image.components()["transformer"]
    names = z_image.FAMILY.original_names(net)
    assert names["layers.0.attention.to_k.weight"] == "layers.0.attention.qkv.weight"
    assert names["all_final_layer.2-1.adaLN_modulation.1.bias"] == "final_layer.adaLN_modulation.1.bias"
    assert names["layers.1.attention.norm_q.weight"] == "layers.1.attention.q_norm.weight"
    assert set(names) == {n for n, _ in net.named_parameters()}
