"""Tiny random-weight models shaped like Stable Diffusion (SD 1.x, SD 2.x, SDXL).

They exist for tests and for the ``make run`` demo checkpoint: seconds to build,
a 64x64 image-to-image run in a fraction of a second, and every architectural
trait the loaders must handle (cross-attention levels, linear vs conv
projections, SDXL's two text encoders, pooled projection and time ids, the
OpenCLIP layout, v-prediction). They follow the same conventions as released
checkpoints (32 norm groups, 64-wide heads where the family uses them, 8 heads
for SD 1.x) so that the loaders infer their architecture from tensor shapes with
no special case for tests.

Weights are seeded and perturbed away from their zero/one initial values, so a
bias or norm that a converter misplaces cannot go unnoticed.
"""
from __future__ import annotations

from typing import Any

from nodes import families
from nodes.checkpoint import clip_configs

#: Family variants the builders know. "sd2-v" is SD 2.x with v-prediction (768-v).
VARIANTS = ("sd1", "sd2", "sd2-v", "sdxl")
#: Inpainting variants: the same family with a 9-channel UNet input (latent + mask +
#: masked-image latent), as SD 1.5 inpainting and SDXL inpainting. Kept apart from
#: VARIANTS so the shared models folder and the loaders' sweeps stay as they were.
INPAINT_VARIANTS = ("sd1-inpaint", "sdxl-inpaint")
INPAINT_SUFFIX = "-inpaint"
#: InstructPix2Pix: SD 1.x with an 8-channel UNet input (latent + the edited image's latent).
IP2P = "sd1-ip2p"
#: SDXL's refiner: bigG alone, five time ids (aesthetic score), attention only in the middle
#: two of four levels, as sd_xl_refiner_1.0. Also kept out of VARIANTS.
REFINER = "sdxl-refiner"
WIDTH = 64  # text encoder width: one 64-wide head, as CLIP's head width


def family_of(variant: str) -> Any:
    if variant == REFINER:
        return families.by_name(REFINER)
    if variant == IP2P:
        return families.by_name("sd1")
    return families.by_name("sd2" if variant.startswith("sd2") else variant.removesuffix(INPAINT_SUFFIX))


def prediction_of(variant: str) -> str:
    return "v_prediction" if variant.endswith("-v") else "epsilon"


def _unet(variant: str):
    from diffusers import UNet2DConditionModel

    family = family_of(variant).name
    in_channels = 9 if variant.endswith(INPAINT_SUFFIX) else 8 if variant == IP2P else 4
    common = dict(family_of(variant).unet_defaults(), sample_size=8, in_channels=in_channels, out_channels=4,
                  layers_per_block=1)
    if family == "sd1":
        return UNet2DConditionModel(**common, block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=WIDTH, attention_head_dim=family_of(variant).unet_heads([32, 64]))
    if family == "sd2":
        return UNet2DConditionModel(**common, block_out_channels=(64, 128),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=WIDTH, attention_head_dim=(1, 2), use_linear_projection=True)
    time_dim = 8
    if family == REFINER:
        return UNet2DConditionModel(**common, block_out_channels=(32, 64, 64, 64),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                      "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                    "UpBlock2D"),
                                    transformer_layers_per_block=2, cross_attention_dim=WIDTH,
                                    attention_head_dim=(1, 1, 1, 1), use_linear_projection=True,
                                    addition_time_embed_dim=time_dim,
                                    projection_class_embeddings_input_dim=5 * time_dim + WIDTH)
    return UNet2DConditionModel(**common, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2), cross_attention_dim=2 * WIDTH,
                                attention_head_dim=(1, 1), use_linear_projection=True,
                                addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + WIDTH)


def _vae(variant: str):
    from diffusers import AutoencoderKL

    # Four levels: a downscale factor of 8, like every SD VAE.
    return AutoencoderKL(**family_of(variant).vae_defaults(), latent_channels=4, layers_per_block=1,
                         block_out_channels=(32, 32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _text(kind: str, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**clip_configs.text_config_defaults(kind), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                            num_hidden_layers=2, num_attention_heads=WIDTH // clip_configs.TEXT_HEAD_WIDTH,
                            projection_dim=WIDTH)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _scheduler(variant: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    family = family_of(variant)
    cls = EulerDiscreteScheduler if family.name.startswith("sdxl") else PNDMScheduler
    config = family.scheduler_config(prediction_of(variant))
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _perturb(module: Any, scale: float = 0.02) -> None:
    """Move every parameter off its initial constant (zero biases, unit norms)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def build_components(variant: str, seed: int = 0) -> dict[str, Any]:
    """Fresh components keyed as diffusers pipelines name them, fp32, in eval mode.

    The same (variant, seed) gives bit-identical weights every time; the global
    torch RNG is left as it was.
    """
    import torch

    from nodes.checkpoint.tokenizer import PAD_BANG, PAD_EOS, clip_tokenizer

    known = VARIANTS + INPAINT_VARIANTS + (REFINER, IP2P)
    if variant not in known:
        raise ValueError(f"unknown tiny model variant {variant!r}; known: {', '.join(known)}")
    family = family_of(variant).name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {"unet": _unet(variant), "vae": _vae(variant)}
        if family == "sdxl":
            parts["text_encoder"] = _text("openai")
            parts["text_encoder_2"] = _text("openclip", projection=True)
        elif family == REFINER:
            parts["text_encoder_2"] = _text("openclip", projection=True)
        else:
            parts["text_encoder"] = _text("openai" if family == "sd1" else "openclip")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if name in parts:
                _perturb(parts[name])
                parts[name].eval()
    if family != REFINER:
        parts["tokenizer"] = clip_tokenizer(PAD_EOS if family in ("sd1", "sdxl") else PAD_BANG)
    if family in ("sdxl", REFINER):
        parts["tokenizer_2"] = clip_tokenizer(PAD_BANG)
    parts["scheduler"] = _scheduler(variant)
    return parts


def pipeline_from_components(components: dict[str, Any], cls: Any = None) -> Any:
    """A diffusers pipeline over the given components (txt2img class by default)."""
    sdxl = "text_encoder_2" in components
    if "text_encoder" not in components and sdxl:  # the refiner: bigG alone, aesthetic-score time ids
        from diffusers import StableDiffusionXLImg2ImgPipeline

        pipe = (cls or StableDiffusionXLImg2ImgPipeline)(**components, text_encoder=None, tokenizer=None,
                                                         requires_aesthetics_score=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if cls is None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
