"""What each Stable Diffusion family fixes that its weights do not reveal.

Tensor shapes give a network's widths and depths, but not everything: attention
head counts, activations, group-norm sizes, the VAE's latent scale and the noise
schedule have to come from the family. These are the values of the released
models (SD 1.x, SD 2.x, SDXL base), shipped here so loading never needs a hub.
The tiny test models follow the same conventions, so they go through the same
inference code as real checkpoints.
"""
from __future__ import annotations

from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl")

#: Every released SD UNet/VAE uses 32 groups in its group norms.
NORM_GROUPS = 32
#: SD 1.x UNets have 8 heads per attention; SD 2.x and SDXL fix the head width at 64.
SD1_UNET_HEADS = 8
HEAD_WIDTH = 64
#: CLIP text transformers (OpenAI's and OpenCLIP's) all use 64-wide heads.
TEXT_HEAD_WIDTH = 64

LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}

# Token ids: OpenAI CLIP (SD 1.x and SDXL's first encoder) pads with <|endoftext|>;
# the OpenCLIP encoders' diffusers configs carry the legacy ids 0/1/2, which make
# transformers pool at the argmax token (the end token) as OpenCLIP does.
_OPENAI_IDS = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu")
_OPENCLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="gelu")


def text_config_defaults(kind: str) -> dict[str, Any]:
    """transformers CLIPTextConfig values that shapes cannot tell (kind: "openai" | "openclip")."""
    base = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                attention_dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
    return {**base, **(_OPENAI_IDS if kind == "openai" else _OPENCLIP_IDS)}


def scheduler_config(family: str, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The diffusers scheduler config the family was trained with (its 1000-step DDPM betas).

    The sampler class is chosen by the sampling node; only the training schedule
    and the prediction type belong to the checkpoint.
    """
    config: dict[str, Any] = {
        "_class_name": "EulerDiscreteScheduler" if family == "sdxl" else "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "timestep_spacing": "leading",
    }
    if family == "sdxl":
        config.update(interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0)
    return config


def unet_defaults(family: str) -> dict[str, Any]:
    """UNet2DConditionModel arguments shared by every checkpoint of a family."""
    config: dict[str, Any] = dict(
        act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
        freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=NORM_GROUPS,
        sample_size={"sd1": 64, "sd2": 96, "sdxl": 128}[family],
    )
    if family == "sdxl":
        config.update(addition_embed_type="text_time", addition_embed_type_num_heads=64)
    return config


def vae_defaults(family: str) -> dict[str, Any]:
    return dict(act_fn="silu", norm_num_groups=NORM_GROUPS, in_channels=3, out_channels=3,
                sample_size=1024 if family == "sdxl" else 512,
                scaling_factor=LATENT_SCALE[family], force_upcast=family == "sdxl")
