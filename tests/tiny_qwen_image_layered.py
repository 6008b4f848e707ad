"""A tiny random-weight Qwen-Image-Layered: tiny Qwen-Image's sizes with the layered switches.

API:
    components()     -> transformer (use_additional_t_cond, use_layer3d_rope), vae (RGBA: 4 pixel
                        channels), text_encoder and tokenizer (tiny Qwen-Image's), scheduler (shift 1,
                        unshifted: the schedule ComfyUI's templates fix with ModelSamplingAuraFlow 1).
    pipeline()       -> QwenImageLayeredPipeline over them.
    save_files(root) -> ComfyUI's three files under ``root``'s model folders (:data:`FILES`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_qwen_image
from flow_family_files import quiet_pipeline

FILES = dict(unet="tiny-qwen_image_layered.safetensors", clip="tiny-qwen_2.5_vl.safetensors",
             vae="tiny-qwen_image_layered_vae.safetensors")


def build(seed: int = 3) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    base = tiny_qwen_image.components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=tiny_qwen_image.LAYERS,
            attention_head_dim=tiny_qwen_image.HEAD_DIM, num_attention_heads=tiny_qwen_image.HEADS,
            joint_attention_dim=tiny_qwen_image.TEXT, axes_dims_rope=tiny_qwen_image.AXES,
            use_additional_t_cond=True, use_layer3d_rope=True)
        tiny_qwen_image._perturb(transformer, 0.05)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, input_channels=4)
        tiny_qwen_image._perturb(vae, 0.02)
    for m in (transformer, vae):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": base["text_encoder"],
            "tokenizer": base["tokenizer"], "processor": None,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("QwenImageLayeredPipeline", components())


def save_files(root: Path) -> Path:
    """ComfyUI's files (:data:`FILES`): the transformer, Qwen2.5-VL, the VAE in the Wan layout."""
    return tiny_qwen_image.save_split(root, FILES, components())
