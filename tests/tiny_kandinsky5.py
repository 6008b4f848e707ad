"""A tiny random-weight Kandinsky 5.0 Image Lite for tests: the real architectures at toy sizes, in the
files users have.

API:
    components()  -> diffusers parts keyed as Kandinsky5T2IPipeline names them (cached; do not mutate):
                     transformer, vae (the tiny FLUX's), text_encoder (the tiny Qwen-Image's Qwen2.5-VL),
                     tokenizer (Kiln's Qwen2.5 one), text_encoder_2 (the tiny FLUX's CLIP-L), tokenizer_2,
                     scheduler (shift 3).
    pipeline()    -> Kandinsky5T2IPipeline over them, its resolution list the test size's (the pipeline snaps
                     other sizes to its 1024-class list).
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer, save_state

#: Transformer: heads of 32 (rotary 8 + 12 + 12), one text block and two visual blocks.
MODEL, FF, TIME, LAYERS = 64, 96, 32, 2
SIZE = 64


def build(seed: int = 5) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel

    import tiny_flux
    import tiny_qwen_image
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Kandinsky5Transformer3DModel(
            in_visual_dim=16, out_visual_dim=16, in_text_dim=tiny_qwen_image.TEXT, in_text_dim2=tiny_flux.TEXT,
            time_dim=TIME, patch_size=(1, 2, 2), model_dim=MODEL, ff_dim=FF, num_text_blocks=1,
            num_visual_blocks=LAYERS, axes_dims=(8, 12, 12))
        with torch.no_grad():  # random weights everywhere (the zero-initialised modulations would hide inputs)
            for p in transformer.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    transformer.eval().requires_grad_(False)
    flux = tiny_flux.components()
    return {"transformer": transformer, "vae": flux["vae"],
            "text_encoder": tiny_qwen_image.components()["text_encoder"], "tokenizer": qwen_tokenizer("2.5"),
            "text_encoder_2": flux["text_encoder"], "tokenizer_2": clip_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    pipe = quiet_pipeline("Kandinsky5T2IPipeline", components())
    pipe.resolutions = [(SIZE, SIZE)]
    return pipe


def transformer_state() -> dict:
    return {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()}


def make_models_folder(root: Any, diffusers: bool = False) -> Path:
    """ComfyUI's folders with the tiny Kandinsky 5: diffusion_models/tiny-kandinsky5.safetensors (the one key
    layout, bare) and tiny-kandinsky5-prefixed.safetensors (``model.diffusion_model.``),
    text_encoders/tiny-qwen_2.5_vl.safetensors (ComfyUI's Qwen2.5-VL layout) and tiny-clip_l.safetensors,
    vae/tiny-ae.safetensors (FLUX's VAE in the original layout), and with ``diffusers``
    checkpoints/tiny-kandinsky5-diffusers/ (Kandinsky5T2IPipeline.save_pretrained)."""
    import tiny_flux
    import tiny_qwen_image

    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-kandinsky5", transformer_state())
    save_state(root / "text_encoders" / "tiny-qwen_2.5_vl.safetensors", tiny_qwen_image.comfy_text_state())
    save_state(root / "text_encoders" / "tiny-clip_l.safetensors", tiny_flux.clip_l_state())
    save_state(root / "vae" / "tiny-ae.safetensors", tiny_flux.vae_state())
    if diffusers:
        pipeline().save_pretrained(str(root / "checkpoints" / "tiny-kandinsky5-diffusers"),
                                   safe_serialization=True)
    return root
