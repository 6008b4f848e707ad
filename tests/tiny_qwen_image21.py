"""A tiny random-weight Qwen-Image 2.1 for tests: the real architectures at toy sizes, in the files users have.

API:
    components()      -> diffusers parts keyed as QwenImage21Pipeline names them (cached; do not mutate):
                         transformer, vae (AutoencoderKLQwenImage21, 64 latent channels, the release's
                         latent statistics), text_encoder (Qwen3VLForConditionalGeneration), processor, scheduler.
    pipeline()        -> QwenImage21Pipeline over them.
    original_state()  -> the transformer in ComfyUI's layout (fused ``img_mlp.gate_up``).
    comfy_text_state() -> the text encoder as ComfyUI's qwen3vl_8b file holds it.
    comfy_vae_state() -> the VAE in ComfyUI's (Wan-style, one-frame 3-D kernels) layout.
    make_models_folder(root) -> ComfyUI's split files (see there).
    make_pipeline_folder(path) -> a diffusers folder as QwenImage21Pipeline.save_pretrained lays it out.

The processor: transformers' Qwen3VLProcessor cannot be built here (its video processor needs
torchvision, which the venv lacks), so :class:`TextProcessor` stands in for its text-only path, the
only one text-to-image uses: the Qwen chat format of a system message (what Qwen3-VL's chat
template renders for one text turn) and the tokenizer's left-padded batch.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, qwen3vl_comfy_state, save_split_transformer, save_state
from tiny_krea2 import TEXT, _perturb, text_config

HEADS, HEAD_DIM, LAYERS = 2, 32, 2
#: ComfyUI's shift as the scheduler's fixed mu (nodes.families.qwen_image21.SCHEDULER).
SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.69,
             "max_shift": 0.69, "base_image_seq_len": 256, "max_image_seq_len": 8192,
             "time_shift_type": "exponential"}
#: The VAE: five levels (16x), one res block each; the decoder's widths differ from the encoder's.
VAE = dict(base_dim=8, decoder_base_dim=12, z_dim=64, dim_mult=[1, 2, 2, 2, 2], num_res_blocks=1,
           temperal_downsample=[False, True, True, True])


class TextProcessor:
    """Qwen3VLProcessor's text-only path over a Qwen tokenizer (module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def apply_chat_template(self, messages: list, tokenize: bool = True, return_dict: bool = False) -> list:
        text = "".join(f"<|im_start|>{m['role']}\n" + "".join(c["text"] for c in m["content"]) + "<|im_end|>\n"
                       for m in messages)
        return [self.tokenizer(text).input_ids] if tokenize else text

    def __call__(self, text: list[str], padding: bool = True, padding_side: str = "left",
                 return_tensors: str = "pt", **kwargs: Any) -> Any:
        return self.tokenizer(text, padding=padding, padding_side=padding_side, return_tensors=return_tensors)


def build(seed: int = 21) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from transformers import Qwen3VLForConditionalGeneration

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImage21Transformer2DModel(
            in_channels=64, out_channels=64, num_layers=LAYERS, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, context_in_dim=TEXT, mlp_ratio=3, axes_dims_rope=(4, 14, 14))
        _perturb(transformer, 0.2)
        text_encoder = Qwen3VLForConditionalGeneration(text_config(layers=3))
        _perturb(text_encoder, 0.02)
        vae = AutoencoderKLQwenImage21(**VAE)
        _perturb(vae, 0.02)
    for m in (transformer, text_encoder, vae):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "processor": TextProcessor(qwen_tokenizer("3")), "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("QwenImage21Pipeline", components())


def original_state() -> dict:
    from nodes.checkpoint.qwen_image21_keys import diffusers_to_original

    return {k: v.contiguous() for k, v in diffusers_to_original(components()["transformer"].state_dict()).items()}


def comfy_text_state() -> dict:
    """ComfyUI's qwen3vl_8b layout: the language model under ``model.``, the vision tower under ``visual.``,
    and its own ``lm_head``."""
    # lm_head kept: the 8B's own (untied), which tells its files from the 4B's
    return qwen3vl_comfy_state(components()["text_encoder"].state_dict(), keep_rest=True)


def comfy_vae_state() -> dict:
    from nodes.checkpoint.qwen_image21_keys import vae_to_original

    resnets = {"encoder": VAE["num_res_blocks"], "decoder": VAE["num_res_blocks"] + 1}
    return {k: v.contiguous() for k, v in vae_to_original(components()["vae"].state_dict(), resnets).items()}


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny Qwen-Image 2.1: diffusion_models/tiny-qwen21.safetensors (ComfyUI's
    keys, bare), tiny-qwen21-prefixed.safetensors (``model.diffusion_model.``),
    tiny-qwen21-diffusers-keys.safetensors, text_encoders/tiny-qwen3vl_8b.safetensors and
    vae/tiny-qwen_image_2.1_vae.safetensors (ComfyUI's layout) and tiny-qwen_image_2.1_vae-diffusers.safetensors."""
    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-qwen21", original_state(),
                           {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()})
    save_state(root / "text_encoders" / "tiny-qwen3vl_8b.safetensors", comfy_text_state())
    save_state(root / "vae" / "tiny-qwen_image_2.1_vae.safetensors", comfy_vae_state())
    save_state(root / "vae" / "tiny-qwen_image_2.1_vae-diffusers.safetensors",
               {k: v.contiguous() for k, v in components()["vae"].state_dict().items()})
    return root


#: The release's size rule (ComfyUI's comment on its 0.69: mu 0.5 at 256 tokens to 0.9 at 8192), for folders.
RELEASE_SCHEDULER = dict(SCHEDULER, base_shift=0.5, max_shift=0.9)


def make_pipeline_folder(path: Any) -> Path:
    """A diffusers folder of the tiny model: each part's ``save_pretrained`` under the pipeline's names, the
    tokenizer under ``processor/`` and a scheduler with the release's size rule (:data:`RELEASE_SCHEDULER`);
    written part by part because the stand-in processor cannot save itself."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    path, parts = Path(path), components()
    for name in ("transformer", "vae", "text_encoder"):
        parts[name].save_pretrained(str(path / name), safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**RELEASE_SCHEDULER).save_pretrained(str(path / "scheduler"))
    parts["processor"].tokenizer.save_pretrained(str(path / "processor"))
    index = {"_class_name": "QwenImage21Pipeline", "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage21"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
             "processor": ["transformers", "Qwen3VLProcessor"], "sample_sigmas": None}
    (path / "model_index.json").write_text(json.dumps(index))
    return path
