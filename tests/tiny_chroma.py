"""A tiny random-weight Chroma for tests: the real architecture at toy sizes.

API:
    components()          -> diffusers parts keyed as ChromaPipeline names them (cached; do not mutate):
                             transformer, vae, text_encoder (T5), tokenizer, scheduler.
    pipeline(cls=None)    -> ChromaPipeline (or cls, e.g. ChromaImg2ImgPipeline) over them.

The VAE, T5 and tokenizer are the tiny FLUX's (tests/tiny_flux.py): Chroma uses FLUX's
16-channel VAE and FLUX's T5-XXL, so sharing them is what the real files do too.
"""
from __future__ import annotations

import functools
from typing import Any

import tiny_flux
from flow_family_files import quiet_pipeline, save_split_transformer

#: Transformer: 2 heads of 32, rope axes as the tiny FLUX's, one double and one single block.
HEADS, HEAD_DIM, AXES = 2, 32, (4, 14, 14)
TEXT = tiny_flux.TEXT  # T5 width = joint attention width


def build(seed: int = 1) -> dict[str, Any]:
    import torch
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from nodes.families import chroma

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT, axes_dims_rope=AXES,
            approximator_num_channels=16, approximator_hidden_dim=64, approximator_layers=2)
        tiny_flux._perturb(transformer, 0.05)
        transformer.eval()
    flux_parts = tiny_flux.components("dev")
    config = {k: v for k, v in chroma.FAMILY.scheduler_config().items() if k not in ("_class_name", "prediction_type")}
    return {"transformer": transformer, "vae": flux_parts["vae"], "text_encoder": flux_parts["text_encoder_2"],
            "tokenizer": flux_parts["tokenizer_2"], "scheduler": FlowMatchEulerDiscreteScheduler(**config)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(cls: Any = None) -> Any:
    return quiet_pipeline(cls or "ChromaPipeline", components(), image_encoder=None, feature_extractor=None)


def save_diffusers(folder: Any) -> Any:
    from pathlib import Path

    folder = Path(folder)
    pipeline().save_pretrained(str(folder), safe_serialization=True)
    return folder


def original_transformer() -> dict:
    """The transformer in Chroma's original key layout (what chroma*.safetensors files hold)."""
    from nodes.checkpoint.chroma_keys import diffusers_to_original

    return diffusers_to_original(components()["transformer"].state_dict())


def make_models_folder(root: Any) -> Any:
    """ComfyUI's folders with the tiny Chroma: diffusion_models/tiny-chroma.safetensors (original keys)
    and tiny-chroma-prefixed.safetensors (``model.diffusion_model.``), tiny-chroma-diffusers-keys.safetensors
    (diffusers' names in one file), text_encoders/tiny-t5xxl.safetensors
    and tiny-clip_l.safetensors (the tiny FLUX's), vae/tiny-flux-ae.safetensors, and
    checkpoints/tiny-chroma-diffusers/ and diffusers/tiny-chroma/ (ChromaPipeline.save_pretrained)."""
    from pathlib import Path

    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-chroma", original_transformer(),
                           dict(components()["transformer"].state_dict()))
    tiny_flux._save(root / "diffusion_models" / "tiny-flux-dev.safetensors", tiny_flux.bfl_transformer("dev"))
    tiny_flux._save(root / "text_encoders" / "tiny-t5xxl.safetensors", tiny_flux.t5_state())
    tiny_flux._save(root / "text_encoders" / "tiny-clip_l.safetensors", tiny_flux.clip_l_state())
    tiny_flux._save(root / "vae" / "tiny-flux-ae.safetensors", tiny_flux.vae_state())
    save_diffusers(root / "checkpoints" / "tiny-chroma-diffusers")
    save_diffusers(root / "diffusers" / "tiny-chroma")  # DiffusersLoader's folder
    return root
