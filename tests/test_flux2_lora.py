"""FLUX.2 [klein] LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on the fused image qkv, a text-stream projection, the fused single-block
``linear1``, an MLP and the image input, written against diffusers' module names (PEFT,
``transformer.``) and against BFL's original layout (ComfyUI's ``diffusion_model.``, kohya's
``lora_unet_``). The reference is independent of Kiln's LoRA code: each delta merged by hand into
the weights of its own layout (an original-layout delta into the BFL state dict, converted back by
the key table that tests/test_flux2_loading.py checks against diffusers' converter). Every file
must agree with its reference within 1/255, and move the image.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_flux2
from flow_family_files import env  # noqa: F401 (env is a fixture)
from flow_family_lora import assert_lora_equals_merged, lora_root, merged_in_layout, random_factors, sample
from nodes.checkpoint.flux2_keys import original_to_diffusers
from nodes.families import flux2
from nodes.handles import ModelHandle

#: diffusers module names (PEFT files) and BFL module names (ComfyUI / kohya files).
DIFFUSERS_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                     "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "transformer_blocks.0.ff.linear_out", "x_embedder")
ORIGINAL_MODULES = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1",
                    "double_blocks.0.img_mlp.2", "img_in")
FORMATS = ("peft", "comfy", "kohya")


def _weights(fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "peft":
        return {k: v for k, v in tiny_flux2.components()["transformer"].state_dict().items()}
    return tiny_flux2.original_transformer()


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down [r, in], up [out, r]), seeded per layout."""
    weights = _weights(fmt)
    modules = DIFFUSERS_MODULES if fmt == "peft" else ORIGINAL_MODULES
    return random_factors([(name, tuple(weights[name + ".weight"].shape)) for name in modules], seed=31)


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    peft, original = _weights("peft"), _weights("comfy")
    assert all(m + ".weight" in peft for m in DIFFUSERS_MODULES)
    assert all(m + ".weight" in original for m in ORIGINAL_MODULES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return lora_root(tmp_path_factory.mktemp("flux2-lora"), "flux-2-klein-tiny.safetensors",
                     tiny_flux2.original_transformer(), {fmt: _factors(fmt) for fmt in FORMATS})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_flux2

    return sample(env, model, test_flux2._clip(), test_flux2._vae().decode, steps=3, cfg=1.0, scheduler="normal",
                  latent=(1, 128, 4, 4), negative="")


def _merged(fmt: str, strength: float) -> ModelHandle:
    """The tiny transformer with every delta added by hand in the LoRA's own layout."""
    return merged_in_layout(flux2.FAMILY, tiny_flux2.components()["transformer"], _weights(fmt), _factors(fmt), strength,
                            None if fmt == "peft" else original_to_diffusers)


@pytest.mark.parametrize("fmt", FORMATS)
def test_flux2_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, "flux-2-klein-tiny.safetensors", f"{fmt}.safetensors",
                              lambda model: _sample(env, model), lambda strength: _merged(fmt, strength))
