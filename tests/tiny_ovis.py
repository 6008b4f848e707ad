"""A tiny random-weight Ovis-Image for tests: the real architecture at toy sizes.

API:
    components()          -> diffusers parts keyed as OvisImagePipeline names them (cached; do not mutate):
                             transformer, vae, text_encoder (Qwen3Model), tokenizer, scheduler.
    pipeline()            -> OvisImagePipeline over them.
    original_transformer() -> the transformer in ComfyUI's layout (ovis_image_bf16.safetensors' keys).
    make_models_folder()  -> ComfyUI's folders with the tiny model in the layouts users have.

The VAE is the tiny FLUX's (Ovis-Image uses FLUX.1's ae.safetensors). The text encoder is Z-Image's tiny
Qwen3 (tests/tiny_z_image.py) with the full Qwen vocabulary, so real prompts tokenize; the tokenizer is Kiln's
Qwen3 one, given a minimal chat template that renders one user turn as Qwen3's does, thinking switched
off when asked (the pipeline asks for a template; Kiln writes the string itself). The scheduler is the
one ComfyUI's template samples with: a fixed shift of 3.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_flux
import tiny_z_image
from flow_family_files import quiet_pipeline, save_split_transformer, with_chat_template

#: Qwen3's rendering of [user message] + generation prompt, with the empty think block when thinking is off.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                 "{% endif %}")
DIM, HEADS = 64, 2
#: The names ComfyUI's template asks for.
UNET, TEXT, VAE = "ovis_image_bf16.safetensors", "ovis_2.5.safetensors", "ae.safetensors"


def build(seed: int = 1) -> dict[str, Any]:
    """The tiny transformer over Z-Image's tiny parts (tests/tiny_z_image.py), which are Ovis-Image's kinds
    too: the tiny Qwen3 (full vocabulary), FLUX's VAE, FlowMatchEuler with a fixed shift of 3; the
    tokenizer is Kiln's Qwen3 one with :data:`CHAT_TEMPLATE`."""
    import torch
    from diffusers import OvisImageTransformer2DModel

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = OvisImageTransformer2DModel(
            in_channels=64, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=DIM // HEADS,
            num_attention_heads=HEADS, joint_attention_dim=48, axes_dims_rope=(4, 14, 14))
        tiny_flux._perturb(transformer, 0.05)
        transformer.eval()
    tokenizer = with_chat_template(qwen_tokenizer("3"), CHAT_TEMPLATE)
    parts = tiny_z_image.components()
    scheduler = type(parts["scheduler"]).from_config(parts["scheduler"].config)
    return {**parts, "transformer": transformer, "tokenizer": tokenizer, "scheduler": scheduler}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("OvisImagePipeline", components())


def original_transformer() -> dict:
    """The transformer as ComfyUI's ovis_image_bf16.safetensors names it (float32 here)."""
    from nodes.checkpoint.ovis_keys import diffusers_to_original

    return diffusers_to_original(dict(components()["transformer"].state_dict()))


def qwen3_file() -> dict:
    """Ovis 2.5's Qwen3 as a ComfyUI text-encoder file holds it (``model.*`` keys)."""
    return {"model." + k: v for k, v in components()["text_encoder"].state_dict().items()}


def make_models_folder(root: Any) -> Path:
    """diffusion_models/tiny-ovis.safetensors (ComfyUI's keys), -prefixed (``model.diffusion_model.``) and
    -diffusers-keys, and the template's ovis_image_bf16.safetensors; text_encoders/ovis_2.5.safetensors
    and tiny-t5xxl.safetensors (the tiny FLUX's, for errors); vae/ae.safetensors (the tiny FLUX VAE);
    diffusion_models/tiny-flux.safetensors (a FLUX transformer, for errors); checkpoints/tiny-ovis-diffusers/
    (OvisImagePipeline.save_pretrained)."""
    root = Path(root)
    original = original_transformer()
    save_split_transformer(root / "diffusion_models", "tiny-ovis", original,
                           dict(components()["transformer"].state_dict()))
    tiny_flux._save(root / "diffusion_models" / UNET, original)
    tiny_flux._save(root / "diffusion_models" / "tiny-flux.safetensors", tiny_flux.bfl_transformer("dev"))
    tiny_flux._save(root / "text_encoders" / TEXT, qwen3_file())
    tiny_flux._save(root / "text_encoders" / "tiny-t5xxl.safetensors", tiny_flux.t5_state())
    tiny_flux._save(root / "vae" / VAE, tiny_flux.vae_state())
    pipeline().save_pretrained(str(root / "checkpoints" / "tiny-ovis-diffusers"), safe_serialization=True)
    return root
