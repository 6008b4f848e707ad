"""Kandinsky 5 LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on a visual block's query and cross-attention key, a text block's feed-forward,
a modulation, the visual embedding and the output projection, under the module names the release,
ComfyUI and diffusers share (PEFT's ``transformer.``, ComfyUI's ``diffusion_model.``, kohya's
``lora_unet_``). The reference is independent of Kiln's LoRA code: each delta merged by hand into the
weights (flow_family_lora). Every file agrees with it within 1/255 and moves the image.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import tiny_kandinsky5
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import assert_lora_equals_merged, lora_root, merged_in_layout, random_factors, sample
from node_call import call
from nodes import loaders, split_loaders
from nodes.families import kandinsky5

MODULES = ("visual_transformer_blocks.0.self_attention.to_query", "visual_transformer_blocks.1.cross_attention.to_key",
           "text_transformer_blocks.0.feed_forward.in_layer", "visual_transformer_blocks.0.visual_modulation.out_layer",
           "visual_embeddings.in_layer", "out_layer.out_layer")
FORMATS = ("peft", "comfy", "kohya")
UNET = "tiny-kandinsky5.safetensors"


def _factors() -> dict:
    weights = tiny_kandinsky5.transformer_state()
    return random_factors([(name, tuple(weights[name + ".weight"].shape)) for name in MODULES], seed=43)


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    assert all(m + ".weight" in tiny_kandinsky5.transformer_state() for m in MODULES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_kandinsky5.make_models_folder(tmp_path_factory.mktemp("kandinsky5-lora"))
    return lora_root(root, UNET, tiny_kandinsky5.transformer_state(), {fmt: _factors() for fmt in FORMATS})


def _sample(env, model):
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1="tiny-qwen_2.5_vl.safetensors",
                   clip_name2="tiny-clip_l.safetensors", type="kandinsky5_image")
    (vae,) = call(loaders.vae_loader, env, vae_name="tiny-ae.safetensors")
    return sample(env, model, clip, vae.decode, steps=3, cfg=2.0, scheduler="simple", latent=(1, 16, 8, 8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_kandinsky5_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, UNET, f"{fmt}.safetensors", lambda model: _sample(env, model),
                              lambda strength: merged_in_layout(kandinsky5.FAMILY,
                                                                tiny_kandinsky5.components()["transformer"],
                                                                tiny_kandinsky5.transformer_state(), _factors(),
                                                                strength))
