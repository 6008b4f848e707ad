"""Wan 2.1 (and ChronoEdit) transformer weights: the original (Wan's, ComfyUI's) key layout <-> diffusers'
ChronoEditTransformer3DModel (the Wan 2.1 image-to-video transformer's names).

Comfy-Org's ``chrono_edit_14B_fp16.safetensors`` names the DiT as Wan's reference code does:
``patch_embedding``, ``text_embedding.0/2``, ``time_embedding.0/2``, ``time_projection.1``,
``img_emb.proj.0/1/3/4`` (the CLIP-vision projection of image-to-video models), ``blocks.N.*`` with
``self_attn.q/k/v/o``, ``cross_attn.q/k/v/o`` and its picture keys ``k_img``/``v_img``/``norm_k_img``,
``norm_q``/``norm_k`` (RMS over all heads), ``norm3`` (the affine cross-attention norm, diffusers'
``norm2``), ``ffn.0/2`` and the block's ``modulation`` table, then ``head.head`` and ``head.modulation``.
Only names change; values and shapes are the same in both layouts. ComfyUI tells a Wan model by
``head.modulation`` and image-to-video by ``img_emb.proj.0.bias``; its head count is ``dim / 128``.
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import (  # noqa: F401 (the key modules' interface)
    UNET_PREFIX, has_keys, renamed_by_table, renamed_lora_modules, strip)

ORIGINAL_MARKER = "head.modulation"
DIFFUSERS_MARKER = "condition_embedder.time_proj.weight"
#: The image-to-video projection of CLIP vision features (ComfyUI's i2v test).
I2V_MARKER = "img_emb.proj.0.bias"
#: Every released Wan 2.1 head is 128 wide (ComfyUI's model detection: heads = dim / 128).
HEAD_DIM = 128
#: (original, diffusers) name starts, tried in order; the first that matches renames the key.
_STARTS = (("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
           ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
           ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
           ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
           ("time_projection.1.", "condition_embedder.time_proj."),
           ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
           ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
           ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
           ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
           ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
           ("head.head.", "proj_out."), ("head.modulation", "scale_shift_table"))
#: (original, diffusers) pieces inside a block's names.
_PIECES = ((".self_attn.o.", ".attn1.to_out.0."), (".cross_attn.o.", ".attn2.to_out.0."),
           (".self_attn.norm_", ".attn1.norm_"), (".cross_attn.norm_k_img.", ".attn2.norm_added_k."),
           (".cross_attn.k_img.", ".attn2.add_k_proj."), (".cross_attn.v_img.", ".attn2.add_v_proj."),
           (".cross_attn.norm_", ".attn2.norm_"), (".norm3.", ".norm2."), (".ffn.0.", ".ffn.net.0.proj."),
           (".ffn.2.", ".ffn.net.2."), (".modulation", ".scale_shift_table"))
_PROJECTIONS = re.compile(r"^(blocks\.\d+)\.(self_attn|cross_attn)\.([qkv])\.")
_TO_PROJECTIONS = re.compile(r"^(blocks\.\d+)\.(attn1|attn2)\.to_([qkv])\.")


class KeyMismatch(ValueError):
    """Keys that do not fit the Wan layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, ORIGINAL_MARKER, "patch_embedding.weight")


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, DIFFUSERS_MARKER, "patch_embedding.weight")


def _projections(key: str, forward: bool) -> str:
    """A block's q/k/v projections: ``self_attn.q`` <-> ``attn1.to_q``, ``cross_attn.k`` <-> ``attn2.to_k``."""
    names = (("self_attn", "cross_attn"), ("attn1", "attn2"))
    (src, dst), pattern = (names if forward else names[::-1]), (_PROJECTIONS if forward else _TO_PROJECTIONS)
    return pattern.sub(lambda m: f"{m.group(1)}.{dst[src.index(m.group(2))]}.{'to_' if forward else ''}{m.group(3)}.",
                       key)


def _renamed(key: str, forward: bool) -> str:
    return renamed_by_table(key, forward, _STARTS, _PIECES, _projections)


def to_diffusers_name(key: str) -> str:
    return _renamed(key, True)


def to_original_name(key: str) -> str:
    return _renamed(key, False)


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors (no prefix) under diffusers' names."""
    foreign = sorted(k for k in state if k.startswith("condition_embedder.") or ".attn1." in k)
    if foreign:
        raise KeyMismatch(f"unexpected {foreign[:4]}{' ...' if len(foreign) > 4 else ''} (diffusers' names in an "
                          "original-layout file)")
    return {to_diffusers_name(k): v for k, v in state.items()}


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    return {to_original_name(k): v for k, v in state.items()}


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """ChronoEditTransformer3DModel arguments from original-layout shapes (ComfyUI's reading: heads of 128)."""
    s = strip(dict(shapes))
    try:
        dim, in_channels, *patch = s["patch_embedding.weight"]
        heads = max(dim // HEAD_DIM, 1)
        config = dict(
            patch_size=tuple(patch), num_attention_heads=heads, attention_head_dim=dim // heads,
            in_channels=in_channels, out_channels=s["head.head.weight"][0] // (patch[0] * patch[1] * patch[2]),
            text_dim=s["text_embedding.0.weight"][1], freq_dim=s["time_embedding.0.weight"][1],
            ffn_dim=s["blocks.0.ffn.0.weight"][0],
            num_layers=len({int(m.group(1)) for k in s for m in [re.match(r"^blocks\.(\d+)\.", k)] if m}),
            cross_attn_norm="blocks.0.norm3.weight" in s, eps=1e-6)
        if I2V_MARKER in s:
            config.update(image_dim=s["img_emb.proj.0.weight"][0], added_kv_proj_dim=dim)
            if "img_emb.emb_pos" in s:
                config["pos_embed_seq_len"] = s["img_emb.emb_pos"][1]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    return config


def lora_modules(names: Any) -> dict[str, str]:
    """Original module name -> diffusers weight name for every linear weight (Wan LoRAs use the original
    names: ``blocks.3.self_attn.q``)."""
    return renamed_lora_modules(names, to_original_name)


def original_names(diffusers_names: Any) -> dict[str, str]:
    return {name: to_original_name(name) for name in diffusers_names}
