"""Qwen-Image LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on image and text attention, both MLPs, the modulation and the output
projection, written as diffusers/PEFT names (``transformer.``), as ComfyUI's (``diffusion_model.``),
bare with ``lora_down``/``lora_up``/``alpha`` (lightx2v's Qwen-Image-Lightning files), as kohya's /
musubi's ``lora_unet_`` names and SimpleTuner's ``lycoris_`` names. ComfyUI's Qwen-Image keys are
diffusers' own names, so every layout names the same modules. The reference is the tiny transformer
with each delta merged by hand (W + scale * up @ down), sampled the same way; every file must agree
within 1/255.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_qwen_image
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import (assert_lora_equals_merged, lora_root, merged_modules, module_shapes,
                              random_factors, sample)
from nodes.families import qwen_image
from nodes.handles import ModelHandle

MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
           "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.attn.to_add_out", "transformer_blocks.0.img_mlp.net.0.proj",
           "transformer_blocks.1.txt_mlp.net.2", "transformer_blocks.0.img_mod.1", "img_in", "txt_in", "proj_out")
FORMATS = ("peft", "comfy", "lightning", "kohya", "lycoris")


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down [r, in], up [out, r]), seeded."""
    return random_factors(module_shapes(tiny_qwen_image.components()["transformer"], MODULES), seed=21)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return lora_root(tmp_path_factory.mktemp("qwen-image-lora"), "tiny-qwen_image.safetensors",
                     tiny_qwen_image.components()["transformer"].state_dict(), {fmt: _factors() for fmt in FORMATS})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_qwen_image

    return sample(env, model, test_qwen_image._clip(), test_qwen_image._vae().decode, steps=3, cfg=4.0,
                  scheduler="normal", latent=(1, 16, 8, 8))


def _merged(strength: float) -> ModelHandle:
    return merged_modules(qwen_image.FAMILY, tiny_qwen_image.components()["transformer"], _factors(), strength)


@pytest.mark.parametrize("fmt", FORMATS)
def test_qwen_image_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, "tiny-qwen_image.safetensors", f"{fmt}.safetensors",
                              lambda model: _sample(env, model), _merged)
