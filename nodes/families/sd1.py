"""Stable Diffusion 1.x: one OpenAI CLIP-L text encoder, 4-channel latents scaled by 0.18215.

Recognised by ``cond_stage_model.transformer.*`` keys (OpenAI CLIP in the original
layout). Conditions on the encoder's last layer (after its final norm); epsilon
prediction on the scaled-linear 1000-step schedule.
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import Family, LatentFormat, Shapes, TextEncoderSpec, has_prefix

#: Fitted latent -> RGB factors for the SD 1.x/2.x VAE (model-space latents).
SD_LATENT = LatentFormat(
    channels=4, scale=0.18215,
    rgb=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
)
TEXT_PREFIX = "cond_stage_model.transformer."


class SD1(Family):
    name = "sd1"
    latent = SD_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "openai", TEXT_PREFIX, layer=-1),)
    sample_size = 64
    clip_types = ("stable_diffusion",)

    def claims(self, shapes: Shapes) -> bool:
        return has_prefix(shapes, TEXT_PREFIX)

    def claims_unet(self, shapes: Shapes) -> bool:
        return "model.diffusion_model.label_emb.0.0.weight" not in shapes  # after SD2 (see MODULES' order)

    def unet_heads(self, channels: list[int]) -> Any:
        return 8  # SD 1.x UNets have 8 heads in every attention


FAMILY = SD1()
