"""A tiny random-weight Qwen-Image for tests: the real architecture at toy sizes.

API:
    components()        -> diffusers parts keyed as QwenImagePipeline names them (cached; do not mutate):
                           transformer, vae, text_encoder (Qwen2.5-VL), tokenizer, scheduler.
    pipeline(cls=None)  -> QwenImagePipeline (or cls, e.g. QwenImageImg2ImgPipeline) over them.

The text encoder is a Qwen2.5-VL of the release's vocabulary size (152064, the tokenizer's ids all
fit) with a two-layer language model and a one-block vision tower (which text-to-image never runs).
The VAE keeps the release's level structure (dim_mult 1,2,4,4, two res blocks, three temporal
downsamplings) at base width 8, so its original-layout keys are the real file's keys.
"""
from __future__ import annotations

import functools
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer

#: Transformer: 2 heads of 32, rope axes summing to the head width, two blocks.
HEADS, HEAD_DIM, AXES, LAYERS = 2, 32, (4, 14, 14), 2
#: Text model width (= the transformer's joint attention width) and the release's vocabulary.
TEXT, VOCAB = 64, 152064
#: Qwen-Image's scheduler config as released (Qwen/Qwen-Image scheduler/scheduler_config.json).
SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
             "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
             "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
             "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}


def _perturb(module: Any, scale: float) -> None:
    """Random weights everywhere (diffusers zero-initialises some output layers, which would make
    the tiny model's output ignore its inputs)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def text_config() -> Any:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=TEXT, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_theta=1000000.0,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT,
                           fullatt_block_indexes=[0], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2))


def build(seed: int = 1) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=LAYERS, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT, axes_dims_rope=AXES)
        _perturb(transformer, 0.05)
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config())
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16)
        _perturb(vae, 0.02)
    for m in (transformer, text_encoder, vae):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": qwen_tokenizer("2.5"), "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(cls: Any = None) -> Any:
    return quiet_pipeline(cls or "QwenImagePipeline", components())


def comfy_text_state(text_encoder: Any = None) -> dict:
    """The text encoder (``text_encoder``, a Qwen2_5_VLForConditionalGeneration, by default this module's)
    as ComfyUI's qwen_2.5_vl_7b*.safetensors holds it: the language model under ``model.``, the vision
    tower under ``visual.``, ``lm_head.weight``."""
    out = {}
    source = text_encoder if text_encoder is not None else components()["text_encoder"]
    for k, v in source.state_dict().items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        out[k] = v.contiguous()
    return out


def make_models_folder(root: Any) -> Any:
    """ComfyUI's folders with the tiny Qwen-Image: diffusion_models/tiny-qwen_image.safetensors (keys as
    ComfyUI's, bare) and tiny-qwen_image-prefixed.safetensors (``model.diffusion_model.``),
    text_encoders/tiny-qwen_2.5_vl.safetensors, vae/tiny-qwen_image_vae.safetensors (the Wan layout),
    and checkpoints/tiny-qwen-image-diffusers/ (QwenImagePipeline.save_pretrained)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from nodes.checkpoint.qwen_image_vae import to_original

    root = Path(root)
    for sub in ("diffusion_models", "text_encoders", "vae", "checkpoints"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    save_split_transformer(root / "diffusion_models", "tiny-qwen_image", components()["transformer"].state_dict())
    save_file(comfy_text_state(), str(root / "text_encoders" / "tiny-qwen_2.5_vl.safetensors"))
    vae = {k: v.contiguous() for k, v in to_original(components()["vae"].state_dict()).items()}
    save_file(vae, str(root / "vae" / "tiny-qwen_image_vae.safetensors"))
    pipeline().save_pretrained(str(root / "checkpoints" / "tiny-qwen-image-diffusers"), safe_serialization=True)
    return root


def save_split(root: Any, files: dict[str, str], parts: dict[str, Any]) -> Any:
    """ComfyUI's three files under ``root``'s model folders, named by ``files`` (unet, clip, vae): the
    transformer of ``parts`` (diffusers' names, as ComfyUI's), this module's Qwen2.5-VL, the VAE of
    ``parts`` in the Wan layout. Shared by the Qwen-Image family tests that load split files."""
    from safetensors.torch import save_file

    from nodes.checkpoint.qwen_image_vae import to_original

    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in parts["transformer"].state_dict().items()},
              str(root / "diffusion_models" / files["unet"]))
    save_file(comfy_text_state(), str(root / "text_encoders" / files["clip"]))
    save_file({k: v.contiguous() for k, v in to_original(parts["vae"].state_dict()).items()},
              str(root / "vae" / files["vae"]))
    return root
