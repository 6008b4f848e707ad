"""Tiny random-weight PixArt-Σ and PixArt-α for tests: the real architecture at toy sizes.

API:
    components(variant)   -> diffusers parts keyed as the PixArt pipelines name them (cached; do not
                             mutate): transformer, vae, text_encoder (T5), tokenizer, scheduler.
                             variant: "sigma" (Σ-1024 layout: no micro-conditioning, 300 tokens, SDXL's
                             VAE scale), "alpha" (α-1024: size/aspect embedders, 120 tokens, SD 1.x's
                             scale) or "alpha512" (α-512: sample size 64, no micro-conditioning).
    pipeline(variant)     -> PixArtSigmaPipeline / PixArtAlphaPipeline over them.
    original_transformer(variant) -> the transformer in PixArt's original key layout, with the tensors
                             the real files carry beyond the loaded ones (the null caption's rows say
                             the variant; α's files store pos_embed).
    make_models_folder(root) -> ComfyUI's folders (see its docstring).

The T5 and its tokenizer are the tiny FLUX's (tests/tiny_flux.py), as PixArt reads the same T5-XXL.
Learned sigma is kept: the transformers output 8 channels, as the released ones do.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_flux

VARIANTS = ("sigma", "alpha", "alpha512")
#: Two heads of PixArt's 72-wide heads (the loader reads heads as width / 72), two blocks.
HEADS, LAYERS = 2, 2
TEXT = tiny_flux.TEXT


def _family(variant: str) -> Any:
    from nodes.families import pixart

    return pixart.SIGMA if variant == "sigma" else pixart.ALPHA


def build(variant: str, seed: int = 2) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PixArtTransformer2DModel

    family = _family(variant)
    size = 64 if variant == "alpha512" else 128
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=HEADS, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=LAYERS,
            cross_attention_dim=HEADS * 72, caption_channels=TEXT, sample_size=size, patch_size=2,
            interpolation_scale=size / 64, use_additional_conditions=variant == "alpha")
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                            block_out_channels=(32, 32, 64, 64), norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=family.latent.scale, sample_size=64)
        for m in (transformer, vae):
            tiny_flux._perturb(m, 0.05)
            m.eval()
        with torch.no_grad():  # the zero-initialised output layers would make every image the same
            transformer.proj_out.weight.normal_(0, 0.05)
            transformer.scale_shift_table.normal_(0, 0.1)
            for block in transformer.transformer_blocks:
                block.scale_shift_table.normal_(0, 0.1)
    flux_parts = tiny_flux.components("dev")
    return {"transformer": transformer, "vae": vae, "text_encoder": flux_parts["text_encoder_2"],
            "tokenizer": flux_parts["tokenizer_2"],
            "scheduler": EulerDiscreteScheduler.from_config(family.scheduler_config())}


@functools.lru_cache(maxsize=None)
def components(variant: str = "sigma") -> dict[str, Any]:
    return build(variant)


def pipeline(variant: str = "sigma") -> Any:
    from flow_family_files import quiet_pipeline

    cls = "PixArtSigmaPipeline" if variant == "sigma" else "PixArtAlphaPipeline"
    return quiet_pipeline(cls, components(variant))


def original_transformer(variant: str = "sigma") -> dict:
    """The transformer as PixArt's own code saves it (original names, fused qkv / kv)."""
    import torch

    from nodes.checkpoint.pixart_keys import diffusers_to_original

    transformer = components(variant)["transformer"]
    state = diffusers_to_original(transformer.state_dict())
    tokens = _family(variant).t5_tokens
    state["y_embedder.y_embedding"] = torch.randn(tokens, TEXT, generator=torch.Generator().manual_seed(0)) * 0.02
    if variant != "sigma":  # α's files store the fixed sin-cos table; its length gives the sample size
        size = transformer.config.sample_size // 2
        state["pos_embed"] = torch.zeros(1, size * size, HEADS * 72)
    return state


def save_diffusers(variant: str, folder: Any) -> Path:
    folder = Path(folder)
    pipeline(variant).save_pretrained(str(folder), safe_serialization=True)
    return folder


def vae_state(variant: str) -> dict:
    from nodes.checkpoint.to_original import vae_to_original

    vae = components(variant)["vae"]
    state = vae_to_original(vae.state_dict(), dict(vae.config))
    return {k[len("first_stage_model."):]: v for k, v in state.items()}


def sd1_clip_l_state() -> dict:
    import tiny_models

    from nodes.checkpoint.to_original import openai_clip_to_original

    return openai_clip_to_original(tiny_models.components("sd1")["text_encoder"].state_dict(), "")


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders: diffusion_models/tiny-pixart-{sigma,alpha,alpha512}.safetensors (original keys),
    tiny-pixart-sigma-prefixed.safetensors (``model.diffusion_model.``), tiny-pixart-sigma-diffusers-keys
    .safetensors, tiny-pixart-sigma.pth (a pickle nesting the tensors under ``state_dict``);
    text_encoders/tiny-t5xxl.safetensors and tiny-clip_l.safetensors (the tiny FLUX's; its CLIP-L is as
    wide as its T5) and tiny-sd1-clip_l.safetensors (the tiny SD 1.x's CLIP-L, 64 wide, as a real CLIP-L
    is narrower than T5-XXL);
    vae/tiny-pixart-{variant}-vae.safetensors; checkpoints/tiny-pixart-{sigma,alpha}-diffusers/ and
    diffusers/tiny-pixart-sigma/ (save_pretrained)."""
    import torch

    from flow_family_files import save_split_transformer

    root = Path(root)
    for variant in VARIANTS:
        diffusers_keys = dict(components(variant)["transformer"].state_dict()) if variant == "sigma" else None
        save_split_transformer(root / "diffusion_models", f"tiny-pixart-{variant}", original_transformer(variant),
                               diffusers_keys)
        tiny_flux._save(root / "vae" / f"tiny-pixart-{variant}-vae.safetensors", vae_state(variant))
    torch.save({"state_dict": {k: v.contiguous() for k, v in original_transformer("sigma").items()}},
               root / "diffusion_models" / "tiny-pixart-sigma.pth")
    tiny_flux._save(root / "text_encoders" / "tiny-t5xxl.safetensors", tiny_flux.t5_state())
    tiny_flux._save(root / "text_encoders" / "tiny-clip_l.safetensors", tiny_flux.clip_l_state())
    tiny_flux._save(root / "text_encoders" / "tiny-sd1-clip_l.safetensors", sd1_clip_l_state())
    for variant in ("sigma", "alpha"):
        save_diffusers(variant, root / "checkpoints" / f"tiny-pixart-{variant}-diffusers")
    save_diffusers("sigma", root / "diffusers" / "tiny-pixart-sigma")
    return root
