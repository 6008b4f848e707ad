"""A tiny random-weight JoyImage Edit for tests: the real architectures at toy sizes, in the files users have.

API:
    components()     -> diffusers parts keyed as JoyImageEditPipeline names them (cached; do not mutate):
                        transformer, vae (Wan 2.1's; the same weights as Kiln's Qwen-Image VAE class),
                        text_encoder (Qwen3VLForConditionalGeneration, two layers, a one-block vision tower),
                        tokenizer (Kiln's Qwen3 one), processor, scheduler.
    pipeline()       -> JoyImageEditPipeline over them, its reference VAE encode taking the posterior's mean
                        (the pipeline samples it; ComfyUI and Kiln take the mean: :func:`pipeline`).
    comfy_text_state() -> the text encoder as ComfyUI's qwen3vl_8b file holds it (``model.``, ``visual.``).
    make_models_folder(root) -> ComfyUI's split files (see there).
    save_pipeline_folder(folder) -> JoyImageEditPipeline.save_pretrained's folder of the tiny parts.
    small_buckets(monkeypatch) -> Kiln's and the pipeline's size buckets at toy sizes.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, qwen3vl_comfy_state, save_split_transformer, save_state
from tiny_krea2 import _perturb, text_config

HIDDEN, HEADS, LAYERS, TEXT = 64, 2, 2, 32
ROPE = [4, 14, 14]  # nodes.checkpoint.joyimage_keys.rope_dims(32)
#: The tests' buckets (h, w) in place of the release's 512..2048 ones (:func:`small_buckets`).
BUCKETS = [(64, 64), (64, 96), (96, 64)]
#: The release's pixel bounds for pictures the vision tower reads (ComfyUI's JoyImage text encoder).
PIXELS = (65536, 16777216)


def processor(tokenizer: Any) -> Any:
    """transformers' Qwen3VLProcessor for pictures alone (its constructor wants a video processor,
    which needs torchvision: the attributes its ``__call__`` reads are set instead)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": PIXELS[0], "longest_edge": PIXELS[1]}, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc.tokenizer, proc.video_processor, proc.chat_template = tokenizer, None, None
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)
    return proc


def build(seed: int = 7) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, JoyImageEditTransformer3DModel
    from transformers import Qwen3VLForConditionalGeneration

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.families import joyimage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = JoyImageEditTransformer3DModel(
            in_channels=16, hidden_size=HIDDEN, num_attention_heads=HEADS, text_dim=TEXT, mlp_width_ratio=2.0,
            num_layers=LAYERS, rope_dim_list=ROPE)
        _perturb(transformer, 0.2)
        text_encoder = Qwen3VLForConditionalGeneration(text_config(layers=2))
        _perturb(text_encoder, 0.02)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16)
        _perturb(vae, 0.02)
    for m in (transformer, text_encoder, vae):
        m.eval().requires_grad_(False)
    tok = qwen_tokenizer("3")
    config = {k: v for k, v in joyimage.SCHEDULER.items()
              if k not in ("_class_name", "prediction_type", "kiln_train_grid")}
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tok,
            "processor": processor(tok), "scheduler": FlowMatchEulerDiscreteScheduler(**config)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    """JoyImageEditPipeline over the tiny parts. Its reference VAE encode samples the posterior
    (``latent_dist.sample()`` without a generator); the random VAE's posterior is wide, so here it
    takes the mean, as ComfyUI's and Kiln's VAE encode do."""
    from diffusers import JoyImageEditPipeline

    pipe = quiet_pipeline(JoyImageEditPipeline, components())
    encode = pipe.vae.encode

    class _Mean:
        def __init__(self, dist: Any) -> None:
            self.latent_dist = dist
            dist.sample = lambda generator=None: dist.mode()

    pipe.vae.encode = lambda x, **kw: _Mean(encode(x, **kw).latent_dist)
    return pipe


def comfy_text_state() -> dict:
    """ComfyUI's qwen3vl_8b layout: the language model under ``model.``, the vision tower under ``visual.``
    (``lm_head`` left out, as the conditioning never reads it)."""
    return qwen3vl_comfy_state(components()["text_encoder"].state_dict(), keep_rest=False)


def transformer_state() -> dict:
    """ComfyUI's and diffusers' keys are the same names (nodes.checkpoint.joyimage_load)."""
    return {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()}


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders: diffusion_models/tiny-joyimage.safetensors (bare keys),
    tiny-joyimage-prefixed.safetensors (``model.diffusion_model.``), tiny-joyimage-diffusers-keys.safetensors,
    text_encoders/tiny-qwen3vl_8b_joyimage.safetensors, vae/tiny-wan_2.1_vae.safetensors (the Wan layout)."""
    from nodes.checkpoint.qwen_image_vae import to_original

    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-joyimage", transformer_state(), transformer_state())
    save_state(root / "text_encoders" / "tiny-qwen3vl_8b_joyimage.safetensors", comfy_text_state())
    save_state(root / "vae" / "tiny-wan_2.1_vae.safetensors", to_original(components()["vae"].state_dict()))
    return root


def small_buckets(monkeypatch: Any, buckets: list | None = None) -> None:
    """Kiln's TextEncodeJoyImageEdit and the pipeline pick sizes from ``buckets`` (:data:`BUCKETS`) instead
    of the release's (512x2048 .. 2048x512): the rule (nearest aspect ratio, cover then centre-crop) is the
    same, the VAE and transformer run on a CPU in a fraction of the time."""
    from diffusers.pipelines.joyimage import image_processor

    from nodes.families import joyimage

    monkeypatch.setattr(joyimage, "BUCKETS", list(buckets or BUCKETS))
    monkeypatch.setitem(image_processor.BUCKETS, 1024, list(buckets or BUCKETS))


def picture(seed: int, width: int, height: int) -> Any:
    """A random smooth 8-bit RGB picture (the Qwen-Image Edit tests' own)."""
    import tiny_qwen_image_edit

    return tiny_qwen_image_edit.picture(seed, width, height)


def save_pipeline_folder(folder: Any) -> Path:
    """JoyImageEditPipeline.save_pretrained's folder of the tiny parts (transformer/, vae/, text_encoder/,
    tokenizer/, processor/, scheduler/, model_index.json). transformers' processor save wants the video
    processor the tests' processor has none of (:func:`processor`), so processor/ gets what it reads:
    the image processor's and the tokenizer's files."""
    import copy

    from diffusers import JoyImageEditPipeline

    parts = dict(components())
    proc = parts["processor"] = copy.copy(parts["processor"])
    proc.save_pretrained = lambda path, **kw: (proc.image_processor.save_pretrained(path),
                                               proc.tokenizer.save_pretrained(path))
    JoyImageEditPipeline(**parts).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
