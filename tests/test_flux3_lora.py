"""FLUX.3 LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on the joint and per-mode blocks' projections, the image embedder, a
modulation head and the output adaLN (whose halves the two layouts order differently), written against
diffusers' module names (PEFT, ``transformer.``) and against BFL's original layout (ComfyUI's
``diffusion_model.``, kohya's ``lora_unet_``). The reference is independent of Kiln's LoRA code: each
delta merged by hand into the weights of its own layout (an original-layout delta into BFL's state
dict, converted by the key table tests/test_flux3.py checks against diffusers' converter). Every file
must agree with its reference within 1/255, and move the image; diffusers' own FLUX.3 LoRA conversion
reads the original names as Kiln's table does.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_flux3
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import assert_lora_equals_merged, lora_file, lora_root, merged_in_layout, random_factors, sample
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint.flux3_keys import original_to_diffusers
from nodes.families import flux3
from nodes.handles import ModelHandle

DIFFUSERS_MODULES = ("single_transformer_blocks.0.attn.to_q", "txt_mode_blocks.0.ff.linear_in",
                     "mode_blocks.image.0.attn.to_out.0", "x_embedders.image", "early_stream_modulations.image.linear",
                     "norm_out.linear")
ORIGINAL_MODULES = ("single_blocks.0.q_proj", "txt_mode_blocks.0.mlp_in", "content_mode_blocks.image.0.attn_out",
                    "emb_in.image", "early_stream_modulations.image.lin", "final_layer.image.adaLN_modulation.1")
FORMATS = ("peft", "comfy", "kohya")
UNET = "flux3-klein-tiny.safetensors"


def _weights(fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "peft":
        return dict(tiny_flux3.components()["transformer"].state_dict())
    return tiny_flux3.original_state()


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights = _weights(fmt)
    modules = DIFFUSERS_MODULES if fmt == "peft" else ORIGINAL_MODULES
    return random_factors([(name, tuple(weights[name + ".weight"].shape)) for name in modules], seed=43)


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    assert all(m + ".weight" in _weights("peft") for m in DIFFUSERS_MODULES)
    assert all(m + ".weight" in _weights("comfy") for m in ORIGINAL_MODULES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_flux3.make_models_folder(tmp_path_factory.mktemp("flux3-lora"))
    return lora_root(root, UNET, tiny_flux3.original_state(), {fmt: _factors(fmt) for fmt in FORMATS})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    (clip,) = call(split_loaders.clip_loader, env, clip_name="qwen3vl_4b-tiny.safetensors", type="flux3")
    (vae,) = call(loaders.vae_loader, env, vae_name="flux2-vae-tiny.safetensors")
    return sample(env, model, clip, vae.decode, steps=3, cfg=2.0, scheduler="simple", latent=(1, 128, 4, 4))


def _merged(fmt: str, strength: float) -> ModelHandle:
    """The tiny transformer with every delta added by hand in the LoRA's own layout."""
    return merged_in_layout(flux3.FAMILY, tiny_flux3.components()["transformer"], _weights(fmt), _factors(fmt),
                            strength, None if fmt == "peft" else original_to_diffusers)


@pytest.mark.parametrize("fmt", FORMATS)
def test_flux3_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, UNET, f"{fmt}.safetensors", lambda model: _sample(env, model),
                              lambda strength: _merged(fmt, strength))


def test_diffusers_reads_the_original_layouts_names_as_kiln_does():
    """diffusers' FLUX.3 LoRA conversion maps each original block module to the diffusers module Kiln's
    table gives (it renames block modules only: the top-level ones are left out here)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux3_lora_to_diffusers

    from nodes.checkpoint.flux3_keys import lora_modules

    blocks = ORIGINAL_MODULES[:3]
    converted = _convert_non_diffusers_flux3_lora_to_diffusers(
        lora_file({m: f for m, f in _factors("comfy").items() if m in blocks}, "comfy"))
    theirs = {k[len("transformer."): -len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")}
    ours = lora_modules({k: tuple(v.shape) for k, v in _weights("peft").items()})
    assert theirs == {ours[m][0][0][: -len(".weight")] if isinstance(ours[m], tuple) else ours[m][: -len(".weight")]
                      for m in blocks}
