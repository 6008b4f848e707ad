"""A tiny random-weight LongCat-Image for tests: the real architecture at toy sizes, in the files users have.

API:
    transformer()         -> the tiny transformer alone (cached; do not mutate).
    components()          -> diffusers parts keyed as LongCatImagePipeline names them (cached; do not mutate):
                             transformer, vae (tests/tiny_flux's FLUX VAE), text_encoder (tests/tiny_qwen_image's
                             Qwen2.5-VL), tokenizer, scheduler (the release's config).
    pipeline()            -> LongCatImagePipeline over them (no text processor: prompt rewriting is not run).
    original_state()      -> the transformer in the original (FLUX-style) layout, as ComfyUI's file holds it.
    make_models_folder(r) -> ComfyUI's folders (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_flux
import tiny_qwen_image
from flow_family_files import quiet_pipeline, save_split_transformer

HEADS, HEAD_DIM, AXES = 2, 32, (4, 14, 14)
TEXT = tiny_qwen_image.TEXT
UNET, CLIP, VAE = "tiny-longcat_image.safetensors", "tiny-qwen_2.5_vl_7b.safetensors", "tiny-longcat-ae.safetensors"


@functools.lru_cache(maxsize=None)
def transformer(seed: int = 3) -> Any:
    """The tiny LongCatImageTransformer2DModel alone (what the loader tests of every family build)."""
    import torch
    from diffusers import LongCatImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LongCatImageTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT, pooled_projection_dim=TEXT, axes_dims_rope=list(AXES))
        tiny_flux._perturb(net, 0.05)
    return net.eval().requires_grad_(False)


def build() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.families import longcat

    config = {k: v for k, v in longcat.SCHEDULER.items() if k not in ("_class_name", "prediction_type")}
    return {"transformer": transformer(), "vae": tiny_flux.components()["vae"],
            "text_encoder": tiny_qwen_image.components()["text_encoder"], "tokenizer": qwen_tokenizer("2.5"),
            "scheduler": FlowMatchEulerDiscreteScheduler(**config)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("LongCatImagePipeline", components(), text_processor=None)


def original_state() -> dict:
    from nodes.checkpoint.longcat_keys import diffusers_to_original

    return diffusers_to_original(transformer().state_dict())


def make_models_folder(root: Any, unet: str = UNET, clip: str = CLIP, vae: str = VAE) -> Path:
    """ComfyUI's folders: diffusion_models/<unet> in the original layout (bare; ``-prefixed`` under
    ``model.diffusion_model.``; ``-diffusers-keys`` in diffusers' names), text_encoders/<clip> (ComfyUI's
    qwen_2.5_vl layout), vae/<vae> (FLUX's ae layout)."""
    root = Path(root)
    stem = unet[: -len(".safetensors")]
    save_split_transformer(root / "diffusion_models", stem, original_state(),
                           diffusers_keys=transformer().state_dict())
    tiny_flux._save(root / "text_encoders" / clip, tiny_qwen_image.comfy_text_state())
    tiny_flux._save(root / "vae" / vae, tiny_flux.vae_state())
    return root


def edit_pipeline() -> Any:
    """LongCatImageEditPipeline over the same parts, its Qwen2-VL processor for pictures alone
    (tests/tiny_qwen_image_edit.processor: the release's pixel bounds)."""
    import tiny_qwen_image_edit

    return quiet_pipeline("LongCatImageEditPipeline", components(), text_processor=tiny_qwen_image_edit.processor())


#: The tests' Edit area in place of the release's 1024x1024 (:func:`shrink_edit_area`).
SMALL_AREA = 64 * 64


def shrink_edit_area(monkeypatch: Any, area: int = SMALL_AREA) -> None:
    """Kiln's LongCat Edit encoding and LongCatImageEditPipeline size pictures to about ``area`` pixels instead
    of 1024x1024 (the pipeline passes the release's area as a literal): the rules under test (rounding up to 16,
    Lanczos, half-size for the vision tower) are the same at any area."""
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as edit

    from nodes.families import longcat

    real = edit.calculate_dimensions
    monkeypatch.setattr(longcat, "EDIT_AREA", area)
    monkeypatch.setattr(edit, "calculate_dimensions", lambda target, ratio: real(area, ratio))
