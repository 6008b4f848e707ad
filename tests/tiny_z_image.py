"""A tiny random-weight Z-Image for tests: the real architecture at toy sizes.

API:
    components()          -> diffusers parts keyed as ZImagePipeline names them (cached; do not mutate):
                             transformer, vae, text_encoder (Qwen3Model), tokenizer, scheduler.
    pipeline(cls=None)    -> ZImagePipeline (or cls, e.g. ZImageImg2ImgPipeline) over them.
    make_models_folder()  -> ComfyUI's folders with the tiny model in the layouts users have.

The VAE is the tiny FLUX's (Z-Image uses FLUX.1's ae.safetensors). The text encoder is the tiny Qwen3
(tests/tiny_qwen3.py) with the full Qwen vocabulary, so real prompts tokenize; the tokenizer is Kiln's
shipped Qwen3 one, given a minimal chat template that renders one user turn as Qwen3's does (the
diffusers pipeline asks for a template; Kiln writes the string itself).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_flux
import tiny_qwen3
from flow_family_files import quiet_pipeline, save_split_transformer, with_chat_template

#: Qwen3's rendering of [user message] + generation prompt (enable_thinking left on: no think block).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DIM, HEADS = 64, 2


def build(seed: int = 1) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Model

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            in_channels=16, dim=DIM, n_layers=2, n_refiner_layers=1, n_heads=HEADS, n_kv_heads=HEADS,
            cap_feat_dim=48, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
        tiny_flux._perturb(transformer, 0.05)
        transformer.eval()
    lm = tiny_qwen3.model(tiny_qwen3.FULL_VOCAB, 2, seed=4)
    encoder = Qwen3Model(lm.config).eval()
    encoder.load_state_dict(lm.model.state_dict())
    tokenizer = with_chat_template(qwen_tokenizer("3"), CHAT_TEMPLATE)
    return {"transformer": transformer, "vae": tiny_flux.components("dev")["vae"], "text_encoder": encoder,
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                         use_dynamic_shifting=False)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(cls: Any = None) -> Any:
    return quiet_pipeline(cls or "ZImagePipeline", components())


def original_transformer() -> dict:
    """The transformer in the original (ComfyUI) layout, with the unused norm_final ComfyUI's files carry."""
    import torch

    from nodes.checkpoint.z_image_keys import diffusers_to_original

    state = diffusers_to_original(components()["transformer"].state_dict())
    state["norm_final.weight"] = torch.ones(DIM)
    return state


def qwen3_file() -> dict:
    """Qwen3 as ComfyUI's qwen_3_4b.safetensors holds it (``model.*`` keys)."""
    return {"model." + k: v for k, v in components()["text_encoder"].state_dict().items()}


def make_models_folder(root: Any) -> Path:
    """diffusion_models/tiny-z-image.safetensors (original keys) and tiny-z-image-prefixed.safetensors
    (``model.diffusion_model.``), tiny-z-image-diffusers-keys.safetensors, text_encoders/tiny-qwen_3_4b.safetensors,
    tiny-t5xxl.safetensors (the tiny FLUX's, for errors), vae/tiny-flux-ae.safetensors, and
    checkpoints/tiny-z-image-diffusers/ and diffusers/tiny-z-image/ (ZImagePipeline.save_pretrained)."""
    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-z-image", original_transformer(),
                           dict(components()["transformer"].state_dict()))
    tiny_flux._save(root / "text_encoders" / "tiny-qwen_3_4b.safetensors", qwen3_file())
    tiny_flux._save(root / "text_encoders" / "tiny-t5xxl.safetensors", tiny_flux.t5_state())
    tiny_flux._save(root / "vae" / "tiny-flux-ae.safetensors", tiny_flux.vae_state())
    for folder in (root / "checkpoints" / "tiny-z-image-diffusers", root / "diffusers" / "tiny-z-image"):
        pipeline().save_pretrained(str(folder), safe_serialization=True)
    return root
