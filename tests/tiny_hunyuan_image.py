"""A tiny random-weight HunyuanImage 2.1 for tests: the real architectures at toy sizes, in the files users have.

API:
    components()  -> diffusers parts keyed as HunyuanImagePipeline names them (cached; do not mutate):
                     transformer (2 double + 2 single blocks, 2 refiner blocks, ByT5 projection), vae
                     (AutoencoderKLHunyuanImage: 64 channels, 32x), text_encoder (a 4-layer Qwen2.5-VL, so
                     the pipeline's ``hidden_states[-3]`` is a layer's output), tokenizer (Kiln's Qwen2.5 one),
                     text_encoder_2 (a 2-layer ByT5: T5EncoderModel over 384 byte ids), tokenizer_2 (ByT5's),
                     scheduler (shift 5).
    pipeline(cfg) -> HunyuanImagePipeline over them with a plain-CFG guider at ``cfg``.
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer, save_state

HEADS, HEAD_DIM, BYT5_WIDTH = 2, 16, 32
SIZE = 128


def _perturb(module: Any, scale: float) -> None:
    """Random weights everywhere (zero-initialised modulations would make the output ignore its inputs)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def build(seed: int = 7) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImageTransformer2DModel
    from transformers import (ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config,
                              T5EncoderModel)

    import tiny_qwen_image
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    base = tiny_qwen_image.text_config()
    text = {k: v for k, v in base.text_config.to_dict().items() if k != "layer_types"} | {"num_hidden_layers": 4}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=base.vision_config.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanImageTransformer2DModel(
            in_channels=64, out_channels=64, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
            num_single_layers=2, num_refiner_layers=2, patch_size=(1, 1), text_embed_dim=tiny_qwen_image.TEXT,
            text_embed_2_dim=BYT5_WIDTH, rope_axes_dim=(8, 8))
        _perturb(transformer, 0.1)
        vae = AutoencoderKLHunyuanImage(
            in_channels=3, out_channels=3, latent_channels=64, block_out_channels=(32, 32, 32, 32, 128, 128),
            layers_per_block=1, spatial_compression_ratio=32, sample_size=SIZE, scaling_factor=0.75289,
            downsample_match_channel=True, upsample_match_channel=True)
        _perturb(vae, 0.02)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=BYT5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    for m in (transformer, vae, text_encoder, byt5):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": qwen_tokenizer("2.5"),
            "text_encoder_2": byt5, "tokenizer_2": ByT5Tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(cfg: float) -> Any:
    """The pipeline with plain CFG at ``cfg`` (AdaptiveProjectedMixGuidance whose projection never starts)."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    guider = AdaptiveProjectedMixGuidance(guidance_scale=cfg, adaptive_projected_guidance_start_step=10**6)
    return quiet_pipeline("HunyuanImagePipeline", components(), guider=guider)


def transformer_state() -> dict:
    """The transformer in Tencent's original layout (nodes.checkpoint.hunyuan_image_keys)."""
    from nodes.checkpoint.hunyuan_image_keys import diffusers_to_original

    return {k: v.contiguous() for k, v in diffusers_to_original(components()["transformer"].state_dict()).items()}


def vae_state() -> dict:
    """The VAE in Tencent's original layout (``encoder.down.N.block.M``, ``mid.block_1``, ``mid.attn_1.q``), as
    ComfyUI's hunyuan_image_2.1_vae file names it: diffusers' names mapped back level by level."""
    import re

    vae = components()["vae"]
    out = {}
    for side, blocks, level_key, resample in (("encoder", vae.encoder.down_blocks, "down", "downsample"),
                                              ("decoder", vae.decoder.up_blocks, "up", "upsample")):
        level, index = 0, 0
        names = {}
        for i, block in enumerate(blocks):
            if hasattr(block, "conv1"):
                names[i] = f"{side}.{level_key}.{level}.block.{index}"
                index += 1
            else:
                names[i] = f"{side}.{level_key}.{level}.{resample}"
                level, index = level + 1, 0
        for i, name in names.items():
            for k, v in blocks[i].state_dict().items():
                out[f"{name}.{k}"] = v
    for k, v in vae.state_dict().items():
        if re.match(r"^(encoder\.down_blocks|decoder\.up_blocks)\.", k):
            continue
        k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        k = re.sub(r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1.", k)
        k = k.replace(".mid_block.attentions.0.proj.", ".mid.attn_1.proj_out.").replace(
            ".mid_block.attentions.0.norm.", ".mid.attn_1.norm.")
        out[k] = v
    return {k: v.contiguous() for k, v in out.items()}


def byt5_state() -> dict:
    """ByT5 as ComfyUI's byt5_small_glyphxl file holds it: T5's names, the shared embedding once."""
    return {k: v.contiguous() for k, v in components()["text_encoder_2"].state_dict().items()
            if k != "encoder.embed_tokens.weight"}


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny HunyuanImage 2.1: diffusion_models/tiny-hunyuanimage2.1.safetensors
    (the original layout, bare) and tiny-hunyuanimage2.1-prefixed.safetensors (``model.diffusion_model.``),
    text_encoders/tiny-qwen_2.5_vl_7b.safetensors (ComfyUI's Qwen2.5-VL layout) and
    tiny-byt5_small_glyphxl.safetensors, vae/tiny-hunyuan_image_2.1_vae.safetensors (the original layout)."""
    import tiny_qwen_image

    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-hunyuanimage2.1", transformer_state())
    save_state(root / "text_encoders" / "tiny-qwen_2.5_vl_7b.safetensors",
               tiny_qwen_image.comfy_text_state(components()["text_encoder"]))
    save_state(root / "text_encoders" / "tiny-byt5_small_glyphxl.safetensors", byt5_state())
    save_state(root / "vae" / "tiny-hunyuan_image_2.1_vae.safetensors", vae_state())
    return root
