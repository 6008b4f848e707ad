"""A tiny random-weight HunyuanImage 2.1 refiner for tests: the real architectures at toy sizes, in the files
users have.

API:
    components()  -> diffusers parts keyed as HunyuanImageRefinerPipeline names them (cached; do not mutate):
                     transformer (3-D 1x1x1 patches, 128 input channels, guidance embedder, no ByT5 projection),
                     vae (AutoencoderKLHunyuanImageRefiner: 32 channels, 16x), text_encoder and tokenizer (the
                     base model's tiny Qwen2.5-VL: tests/tiny_hunyuan_image.py), scheduler (shift 4).
    pipeline()    -> HunyuanImageRefinerPipeline over them (its default guider: no CFG).
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_hunyuan_image
from flow_family_files import quiet_pipeline, save_split_transformer, save_state

#: Pixels a side of the test pictures (4 x 4 latent cells).
SIZE = 64
HEADS, HEAD_DIM = 2, 32


def build(seed: int = 11) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLHunyuanImageRefiner, FlowMatchEulerDiscreteScheduler, \
        HunyuanImageTransformer2DModel

    import tiny_qwen_image

    base = tiny_hunyuan_image.components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanImageTransformer2DModel(
            in_channels=128, out_channels=64, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
            num_single_layers=2, num_refiner_layers=2, patch_size=(1, 1, 1), text_embed_dim=tiny_qwen_image.TEXT,
            text_embed_2_dim=None, guidance_embeds=True, rope_axes_dim=(4, 14, 14))
        tiny_hunyuan_image._perturb(transformer, 0.1)
        vae = AutoencoderKLHunyuanImageRefiner(latent_channels=32, block_out_channels=(32, 32, 64, 64, 128),
                                               layers_per_block=1, spatial_compression_ratio=16,
                                               temporal_compression_ratio=4)
        tiny_hunyuan_image._perturb(vae, 0.02)
    for m in (transformer, vae):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": base["text_encoder"],
            "tokenizer": base["tokenizer"], "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                                                         shift=4.0)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("HunyuanImageRefinerPipeline", components())


def transformer_state() -> dict:
    """The transformer in Tencent's original layout (nodes.checkpoint.hunyuan_image_keys)."""
    from nodes.checkpoint.hunyuan_image_keys import diffusers_to_original

    return {k: v.contiguous() for k, v in diffusers_to_original(components()["transformer"].state_dict()).items()}


def vae_original_state() -> dict:
    """The VAE in Tencent's names (``encoder.down.N.block.M``, ``down.N.downsample``, ``mid.block_1``,
    ``mid.attn_1.q``), diffusers' names mapped back one pattern at a time (:func:`original_names`)."""
    return original_names(components()["vae"].state_dict())


def original_names(state: dict) -> dict:
    """A diffusers-named causal VAE ``state`` (this refiner's or HunyuanVideo 1.5's: one layout) in Tencent's
    names."""
    import re

    back = ((r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3."),
            (r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample."),
            (r"^(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.up.\2.block.\3."),
            (r"^(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.", r"\1.up.\2.upsample."),
            (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
            (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
            (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."))
    out = {}
    for k, v in state.items():
        for pattern, repl in back:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v.contiguous()
    return out


def make_models_folder(root: Any) -> Path:
    """The base model's folders (tests/tiny_hunyuan_image.py: its Qwen2.5-VL and ByT5 files) plus
    diffusion_models/tiny-hunyuanimage2.1-refiner.safetensors (original layout; -prefixed under
    ``model.diffusion_model.``; -diffusers-keys with diffusers' names) and vae/tiny-hunyuan_image_refiner_vae
    .safetensors (diffusers' names; -original in Tencent's)."""
    root = tiny_hunyuan_image.make_models_folder(root)
    transformer = components()["transformer"]
    save_split_transformer(root / "diffusion_models", "tiny-hunyuanimage2.1-refiner", transformer_state(),
                           diffusers_keys={k: v.contiguous() for k, v in transformer.state_dict().items()})
    save_state(root / "vae" / "tiny-hunyuan_image_refiner_vae.safetensors",
               {k: v.contiguous() for k, v in components()["vae"].state_dict().items()})
    save_state(root / "vae" / "tiny-hunyuan_image_refiner_vae-original.safetensors", vae_original_state())
    return root
