"""Krea 2 LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on a block's query and MLP, a text-fusion gate, the patch embedder, the
shared modulation and the output projection, written against diffusers' module names (PEFT,
``transformer.``) and against Krea's original layout (the Krea 2 trainer's and ComfyUI's
``diffusion_model.``, kohya's ``lora_unet_``, AI-Toolkit's ``base_model.model.``: the prefixes
diffusers' Krea 2 LoRA conversion reads). The reference is independent of Kiln's LoRA code: each
delta merged by hand into the weights of its own layout (an original-layout delta into Krea's state
dict, converted by the key table tests/test_krea2.py checks against diffusers' converter). Every file
must agree with its reference within 1/255, and move the image.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_krea2
from flow_family_files import env, save_state  # noqa: F401 (env is a fixture)
from flow_family_lora import assert_lora_equals_merged, lora_file, lora_root, merged_in_layout, random_factors, sample
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint.krea2_keys import original_to_diffusers
from nodes.families import krea2
from nodes.handles import ModelHandle

DIFFUSERS_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.down",
                     "text_fusion.refiner_blocks.0.attn.to_gate", "img_in", "time_mod_proj", "final_layer.linear")
ORIGINAL_MODULES = ("blocks.0.attn.wq", "blocks.1.mlp.down", "txtfusion.refiner_blocks.0.attn.gate", "first",
                    "tproj.1", "last.linear")
FORMATS = ("peft", "comfy", "kohya", "aitoolkit")
UNET = "tiny-krea2.safetensors"


def _weights(fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "peft":
        return dict(tiny_krea2.components()["transformer"].state_dict())
    return tiny_krea2.original_state()


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights = _weights(fmt)
    modules = DIFFUSERS_MODULES if fmt == "peft" else ORIGINAL_MODULES
    return random_factors([(name, tuple(weights[name + ".weight"].shape)) for name in modules], seed=41)


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    assert all(m + ".weight" in _weights("peft") for m in DIFFUSERS_MODULES)
    assert all(m + ".weight" in _weights("comfy") for m in ORIGINAL_MODULES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_krea2.make_models_folder(tmp_path_factory.mktemp("krea2-lora"))
    lora_root(root, UNET, tiny_krea2.original_state(), {fmt: _factors(fmt) for fmt in FORMATS if fmt != "aitoolkit"})
    comfy = lora_file(_factors("aitoolkit"), "comfy")
    save_state(root / "loras" / "aitoolkit.safetensors",
               {"base_model.model." + k[len("diffusion_model."):]: v for k, v in comfy.items()})
    return root


def _sample(env, model: ModelHandle) -> torch.Tensor:
    (clip,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl_4b.safetensors", type="krea2")
    (vae,) = call(loaders.vae_loader, env, vae_name="tiny-qwen_image_vae.safetensors")
    return sample(env, model, clip, vae.decode, steps=3, cfg=2.0, scheduler="simple", latent=(1, 16, 8, 8))


def _merged(fmt: str, strength: float) -> ModelHandle:
    """The tiny transformer with every delta added by hand in the LoRA's own layout."""
    return merged_in_layout(krea2.FAMILY, tiny_krea2.components()["transformer"], _weights(fmt), _factors(fmt), strength,
                            None if fmt == "peft" else original_to_diffusers)


@pytest.mark.parametrize("fmt", FORMATS)
def test_krea2_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, UNET, f"{fmt}.safetensors", lambda model: _sample(env, model),
                              lambda strength: _merged(fmt, strength))


def test_diffusers_reads_the_original_layouts_names_as_kiln_does():
    """diffusers' Krea 2 LoRA conversion maps each original module name to the diffusers module Kiln's
    table gives (Kiln's map is checked against an independent reader of the same files)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_krea2_lora_to_diffusers

    from nodes.checkpoint.krea2_keys import lora_modules

    converted = _convert_non_diffusers_krea2_lora_to_diffusers(lora_file(_factors("comfy"), "comfy"))
    theirs = {k[len("transformer."): -len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")}
    ours = lora_modules(_weights("peft"))
    assert theirs == {ours[m][: -len(".weight")] for m in ORIGINAL_MODULES}
