"""A tiny random-weight Krea 2 for tests: the real architectures at toy sizes, in the files users have.

API:
    components()      -> diffusers parts keyed as Krea2Pipeline names them (cached; do not mutate):
                         transformer, vae (Qwen-Image's), text_encoder (Qwen3VLModel, 36 layers so the
                         taps 2..35 exist), tokenizer (Kiln's Qwen3 one), scheduler.
    pipeline(distilled) -> Krea2Pipeline over them (is_distilled as given: Turbo's fixed mu or Raw's size rule).
    original_state()  -> the transformer in Krea's / ComfyUI's key layout (diffusers' converter's inverse).
    comfy_text_state() -> the text encoder as ComfyUI's qwen3vl_4b file holds it.
    check_text_model(clip) -> asserts a loaded CLIP holds that text model, weights bit for bit.
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer, save_state

#: Transformer: 2 query heads of 32 over 1 key/value head, two blocks; 12 tapped text layers of width TEXT.
HEADS, HEAD_DIM, KV_HEADS, LAYERS = 2, 32, 1, 2
TEXT, TEXT_LAYERS = 32, 36
#: Krea 2's scheduler (the Raw pipeline's size rule reads these; Turbo fixes mu at 1.15).
SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 6400,
             "time_shift_type": "exponential"}


def _perturb(module: Any, scale: float) -> None:
    """Random weights everywhere (the zero-initialised norms and modulation tables would hide inputs)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def text_config(layers: int = TEXT_LAYERS) -> Any:
    """A tiny Qwen3-VL (``layers`` decoder layers; Krea 2 needs 36 for its taps, Qwen-Image 2.1 reads the last)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=TEXT, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT,
                           deepstack_visual_indexes=[0], patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=64))


def build(seed: int = 11) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Transformer2DModel
    from transformers import Qwen3VLModel

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Krea2Transformer2DModel(
            in_channels=64, num_layers=LAYERS, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, intermediate_size=96, timestep_embed_dim=32, text_hidden_dim=TEXT,
            num_text_layers=12, text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=48,
            num_layerwise_text_blocks=1, num_refiner_text_blocks=2, axes_dims_rope=(8, 12, 12))
        _perturb(transformer, 0.2)
        text_encoder = Qwen3VLModel(text_config())
        _perturb(text_encoder, 0.02)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16)
        _perturb(vae, 0.02)
    for m in (transformer, text_encoder, vae):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": qwen_tokenizer("3"),
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(distilled: bool = True) -> Any:
    return quiet_pipeline("Krea2Pipeline", components(), is_distilled=distilled)


def original_state() -> dict:
    from nodes.checkpoint.krea2_keys import diffusers_to_original

    return {k: v.contiguous() for k, v in diffusers_to_original(components()["transformer"].state_dict()).items()}


def comfy_text_state(encoder: Any = None) -> dict:
    """ComfyUI's qwen3vl_4b layout (of ``encoder``, a Qwen3VLModel, else the tiny Krea 2's): the language
    model under ``model.``, the vision tower under ``visual.``."""
    out = {}
    for k, v in (components()["text_encoder"] if encoder is None else encoder).state_dict().items():
        if k.startswith("language_model."):
            k = "model." + k[len("language_model."):]
        out[k] = v.contiguous()
    return out


def check_text_model(clip: Any) -> None:
    """``clip`` (CLIPLoader on :func:`comfy_text_state`'s file) holds transformers' Qwen3VLTextModel with
    exactly the tiny Qwen3-VL's language-model weights: the module itself, or the ``language_model`` of a
    Qwen3VLModel where the family reads pictures (Krea 2: its tower is checked in test_qwen3vl_vision)."""
    import torch

    want = components()["text_encoder"].language_model.state_dict()
    with clip.encoder("text_encoder") as module:
        reads_pictures = bool(getattr(clip.family, "text_vision", False))
        assert type(module).__name__ == ("Qwen3VLModel" if reads_pictures else "Qwen3VLTextModel")
        qwen = module.language_model if reads_pictures else module
        assert type(qwen).__name__ == "Qwen3VLTextModel"
        got = qwen.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny Krea 2: diffusion_models/tiny-krea2.safetensors (Krea's keys, bare),
    tiny-krea2-prefixed.safetensors (``model.diffusion_model.``), tiny-krea2-diffusers-keys.safetensors,
    text_encoders/tiny-qwen3vl_4b.safetensors, vae/tiny-qwen_image_vae.safetensors (the Wan layout), and
    checkpoints/tiny-krea2-turbo-diffusers/ and tiny-krea2-raw-diffusers/ (Krea2Pipeline.save_pretrained,
    is_distilled True and False)."""
    from nodes.checkpoint.qwen_image_vae import to_original

    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-krea2", original_state(),
                           {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()})
    save_state(root / "text_encoders" / "tiny-qwen3vl_4b.safetensors", comfy_text_state())
    save_state(root / "vae" / "tiny-qwen_image_vae.safetensors", to_original(components()["vae"].state_dict()))
    for distilled, name in ((True, "tiny-krea2-turbo-diffusers"), (False, "tiny-krea2-raw-diffusers")):
        pipeline(distilled).save_pretrained(str(root / "checkpoints" / name), safe_serialization=True)
    return root
