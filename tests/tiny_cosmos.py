"""A tiny random-weight Cosmos Predict2 text-to-image model for tests: the real architectures at toy sizes.

API:
    components()      -> diffusers parts keyed as Cosmos2TextToImagePipeline names them (cached; do not mutate):
                         transformer (CosmosTransformer3DModel, 2 heads of 16, 2 blocks), vae (AutoencoderKLWan),
                         text_encoder (T5 v1.0: ReLU feed-forward, as t5-11b), tokenizer (Kiln's T5 one), scheduler
                         (FlowMatchEulerDiscreteScheduler with Karras sigmas, the release's config).
    pipeline()        -> Cosmos2TextToImagePipeline over them (no safety checker).
    original_state()  -> the transformer in the original (ComfyUI / NVIDIA) key layout.
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import save_split_transformer, save_state
from tiny_flux import _perturb

HIDDEN, HEADS, HEAD, LAYERS, TEXT = 32, 2, 16, 2, 32
#: The release's scheduler config (nvidia/Cosmos-Predict2-2B-Text2Image scheduler_config.json's flags).
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, use_karras_sigmas=True)


def t5_v1_0(seed: int = 3) -> Any:
    """T5EncoderModel with T5 v1.0's ReLU feed-forward (one ``wi``), the tokenizer's vocabulary."""
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT, d_kv=8, d_ff=2 * TEXT, num_layers=2, num_heads=4,
                                     feed_forward_proj="relu", is_encoder_decoder=False, use_cache=False))
    return t5.eval().requires_grad_(False)


def build(seed: int = 11) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler

    from nodes.checkpoint.t5_tokenizer import t5_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CosmosTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=HEADS, attention_head_dim=HEAD, num_layers=LAYERS,
            mlp_ratio=2.0, text_embed_dim=TEXT, adaln_lora_dim=8, max_size=(128, 240, 240), patch_size=(1, 2, 2),
            rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None)
        _perturb(transformer, 0.1)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16)
        _perturb(vae, 0.02)
    for m in (transformer, vae):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": t5_v1_0(), "tokenizer": t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


class PassingChecker:
    """A stand-in for NVIDIA's guardrail (the ``cosmos_guardrail`` package, not installed; the pipeline refuses
    to run without a checker): every prompt is safe and every video comes back as given. The pipeline then
    rounds its frames to 8 bits before handing them back, as SaveImage does."""

    def to(self, *args: Any, **kwargs: Any) -> "PassingChecker":
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video: Any) -> Any:
        return video


def pipeline() -> Any:
    """Cosmos2TextToImagePipeline over the tiny parts; its guardrail is a separate package, left out, and
    its padding-mask resize is Kiln's stand-in where torchvision is not installed (an all-zero mask either way)."""
    from diffusers import Cosmos2TextToImagePipeline

    from nodes.families.cosmos import ensure_mask_resize

    ensure_mask_resize()

    pipe = Cosmos2TextToImagePipeline(**components(), safety_checker=PassingChecker())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def original_state() -> dict:
    """The transformer under the original names (nodes.checkpoint.cosmos_keys), with a buffer the real
    files carry beyond the weights."""
    import torch

    from nodes.checkpoint.cosmos_keys import diffusers_to_original

    state = diffusers_to_original({k: v.contiguous() for k, v in components()["transformer"].state_dict().items()})
    state["pos_embedder.dim_spatial_range"] = torch.arange(4)
    return state


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders: diffusion_models/tiny-cosmos.safetensors (bare original keys),
    tiny-cosmos-prefixed.safetensors (``model.diffusion_model.``), tiny-cosmos-net.safetensors (NVIDIA's ``net.``),
    tiny-cosmos-diffusers-keys.safetensors; text_encoders/tiny-oldt5_xxl.safetensors (T5 v1.0);
    vae/tiny-wan_2.1_vae.safetensors (the Wan layout)."""
    from nodes.checkpoint.qwen_image_vae import to_original

    root = Path(root)
    state = original_state()
    diffusers_keys = {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()}
    save_split_transformer(root / "diffusion_models", "tiny-cosmos", state, diffusers_keys)
    save_state(root / "diffusion_models" / "tiny-cosmos-net.safetensors", {"net." + k: v for k, v in state.items()})
    save_state(root / "text_encoders" / "tiny-oldt5_xxl.safetensors",
               {k: v.clone() for k, v in components()["text_encoder"].state_dict().items()
                if k != "encoder.embed_tokens.weight"})  # tied to shared.weight, stored once
    save_state(root / "vae" / "tiny-wan_2.1_vae.safetensors", to_original(components()["vae"].state_dict()))
    return root
