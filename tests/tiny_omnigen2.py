"""A tiny random-weight OmniGen2 for tests: Kiln's module at toy sizes, as ComfyUI's files hold it.

API:
    transformer()          -> the tiny OmniGen2Transformer (float32, cached; do not mutate)
    text_encoder()         -> a tiny transformers Qwen2_5_VLForConditionalGeneration (cached)
    make_models_folder(root) -> diffusion_models/tiny-omnigen2.safetensors (bare keys) and
                              tiny-omnigen2-prefixed.safetensors, text_encoders/tiny-qwen_2.5_vl_3b.safetensors
                              (ComfyUI's layout, no lm_head: the 3B ties it), vae/tiny-flux-ae.safetensors

Every weight is random (no zero-initialised layer), so every input moves the output.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

#: 2 heads of 24 (rotary axes 8, 8, 8), 1 k/v head, two joint layers and one refiner layer each.
DIM, HEADS, KV_HEADS, LAYERS, REFINERS, INNER = 48, 2, 1, 2, 1, 96
TEXT = 64
UNET, CLIP, VAE = "tiny-omnigen2.safetensors", "tiny-qwen_2.5_vl_3b.safetensors", "tiny-flux-ae.safetensors"


def build_transformer(seed: int = 3) -> Any:
    import torch

    from nodes.checkpoint.omnigen2_net import OmniGen2Transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OmniGen2Transformer(hidden_size=DIM, num_attention_heads=HEADS, num_kv_heads=KV_HEADS,
                                    num_layers=LAYERS, num_refiner_layers=REFINERS, in_channels=16, ffn_inner=INNER,
                                    text_feat_dim=TEXT, axes_dim_rope=(8, 8, 8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                scale = 0.5 if name == "image_index_embedding" else 0.15
                gain = p.ndim == 1 and ("norm" in name or "caption_embedder.0." in name)  # a norm's weight
                p.copy_(torch.randn_like(p) * scale + (1.0 if gain else 0.0))
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def transformer() -> Any:
    return build_transformer()


@functools.lru_cache(maxsize=None)
def text_encoder() -> Any:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import tiny_qwen_image

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen_image.text_config())
    return model.eval().requires_grad_(False)


def comfy_text_state() -> dict:
    """The tiny Qwen2.5-VL as ComfyUI's qwen_2.5_vl_fp16.safetensors holds it, without ``lm_head``."""
    import tiny_qwen_image

    state = tiny_qwen_image.comfy_text_state(text_encoder())
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


def make_models_folder(root: Any) -> Path:
    import tiny_flux
    from flow_family_files import save_split_transformer

    root = Path(root)
    state = {k: v.contiguous() for k, v in transformer().state_dict().items()}
    save_split_transformer(root / "diffusion_models", UNET[: -len(".safetensors")], state)
    tiny_flux._save(root / "text_encoders" / CLIP, comfy_text_state())
    tiny_flux._save(root / "vae" / VAE, tiny_flux.vae_state())
    return root
