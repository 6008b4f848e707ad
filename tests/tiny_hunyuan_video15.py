"""A tiny random-weight HunyuanVideo 1.5 (Capybara's architecture) for tests: the real architectures at toy
sizes, in the files users have.

API:
    components()  -> diffusers parts keyed as HunyuanVideo15Pipeline names them (cached; do not mutate):
                     transformer (2 double blocks, 2 refiner blocks, 65 input channels, ByT5 and image
                     projections), vae (AutoencoderKLHunyuanVideo15: 32 channels, 16x), image_encoder (a 2-layer
                     SigLIP at SIZE, the image-to-video pipeline's), the text encoders of
                     tests/tiny_hunyuan_image.py (a 4-layer Qwen2.5-VL's text model, Qwen2_5_VLTextModel as the
                     pipeline and the release hold it: the same weights without the 152064-word head the
                     pipeline never reads; a 2-layer ByT5), tokenizer (Kiln's
                     Qwen2.5 one with Qwen2.5's chat layout for text turns, :data:`CHAT`), tokenizer_2.
    pipeline(cfg, shift, edit) -> HunyuanVideo15Pipeline over them (ClassifierFreeGuidance at ``cfg``,
                     FlowMatchEuler at ``shift``); with ``edit`` HunyuanVideo15ImageToVideoPipeline.
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_hunyuan_image
from flow_family_files import quiet_pipeline, save_split_transformer, save_state, with_chat_template

HEADS, HEAD_DIM, IMAGE_WIDTH = 2, 32, 64  # IMAGE_WIDTH: the tiny SigLIP's width
SIZE = 64
#: Qwen2.5(-VL)'s chat template for text turns (a system turn given, the assistant's turn opened on request).
CHAT = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(seed: int = 11) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel

    import tiny_qwen_image

    base = tiny_hunyuan_image.components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=65, out_channels=32, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
            num_refiner_layers=2, patch_size=1, patch_size_t=1, text_embed_dim=tiny_qwen_image.TEXT,
            text_embed_2_dim=tiny_hunyuan_image.BYT5_WIDTH, image_embed_dim=IMAGE_WIDTH, rope_axes_dim=(4, 14, 14),
            task_type="t2v", target_size=SIZE)  # target_size: the edit pipeline's size bucket
        tiny_hunyuan_image._perturb(transformer, 0.1)
        vae = AutoencoderKLHunyuanVideo15(latent_channels=32, block_out_channels=(32, 32, 64, 64, 128),
                                          layers_per_block=1, spatial_compression_ratio=16,
                                          temporal_compression_ratio=4)
        tiny_hunyuan_image._perturb(vae, 0.02)
        from transformers import SiglipVisionConfig, SiglipVisionModel

        siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=IMAGE_WIDTH, intermediate_size=128,
                                                      num_hidden_layers=2, num_attention_heads=16, image_size=SIZE,
                                                      patch_size=8, hidden_act="gelu_pytorch_tanh"))
    for m in (transformer, vae, siglip):
        m.eval().requires_grad_(False)
    return {"image_encoder": siglip, "transformer": transformer, "vae": vae,
            "text_encoder": base["text_encoder"].model.language_model,
            "tokenizer": with_chat_template(base["tokenizer"], CHAT), "text_encoder_2": base["text_encoder_2"],
            "tokenizer_2": base["tokenizer_2"]}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(cfg: float, shift: float, edit: bool = False) -> Any:
    """HunyuanVideo15Pipeline, or with ``edit`` HunyuanVideo15ImageToVideoPipeline (the tiny SigLIP and a
    SiglipImageProcessor at its size, mean and std 0.5 as SigLIP's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import SiglipImageProcessor

    parts = {k: v for k, v in components().items() if k != "image_encoder"}
    extra = {}
    if edit:
        extra = {"image_encoder": components()["image_encoder"], "feature_extractor": SiglipImageProcessor(
            size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)}
    return quiet_pipeline("HunyuanVideo15ImageToVideoPipeline" if edit else "HunyuanVideo15Pipeline", parts,
                          guider=ClassifierFreeGuidance(guidance_scale=cfg),
                          scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift), **extra)


def transformer_state() -> dict:
    """The transformer in Tencent's original layout (nodes.checkpoint.hunyuan_video15_keys)."""
    from nodes.checkpoint.hunyuan_video15_keys import diffusers_to_original

    return {k: v.contiguous() for k, v in diffusers_to_original(components()["transformer"].state_dict()).items()}


def vae_state() -> dict:
    """The VAE in Tencent's names, as ComfyUI's hunyuanvideo15_vae file holds it (the refiner VAE's
    renames, run backwards: tests/tiny_hunyuan_image_refiner.py, the same layout)."""
    import tiny_hunyuan_image_refiner

    return tiny_hunyuan_image_refiner.original_names(components()["vae"].state_dict())


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny HunyuanVideo 1.5: diffusion_models/tiny-hunyuanvideo15.safetensors
    (the original layout; -prefixed under ``model.diffusion_model.``; -diffusers-keys with diffusers' names),
    HunyuanImage 2.1's tiny text encoder files (tests/tiny_hunyuan_image.py) and
    vae/tiny-hunyuanvideo15_vae.safetensors (Tencent's names), clip_vision/tiny-sigclip.safetensors (ComfyUI's
    ``vision_model.`` names)."""
    root = tiny_hunyuan_image.make_models_folder(root)
    save_split_transformer(root / "diffusion_models", "tiny-hunyuanvideo15", transformer_state(),
                           {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()})
    save_state(root / "vae" / "tiny-hunyuanvideo15_vae.safetensors", vae_state())
    siglip = components()["image_encoder"].state_dict()
    save_state(root / "clip_vision" / "tiny-sigclip.safetensors",
               {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in siglip.items()})
    return root
