"""Krea 2 transformer weights: the original (Krea's, ComfyUI's) key layout <-> diffusers' Krea2Transformer2DModel.

Krea's release and Comfy-Org's ``krea2_turbo_*.safetensors`` name the single-stream DiT as its
reference code does: ``first`` (the patch embedder), ``tmlp.0`` / ``tmlp.2`` (the time MLP),
``tproj.1`` (the shared modulation), ``txtfusion.*`` (the text fusion: ``layerwise_blocks``,
``projector``, ``refiner_blocks``), ``txtmlp.0/1/3`` (the text projection), ``blocks.N.*`` with
``attn.wq/wk/wv/wo/gate``, ``attn.qknorm.qnorm/knorm.scale``, ``mlp.gate/up/down``,
``prenorm/postnorm.scale`` and the block's modulation table ``mod.lin`` (stored flat, six rows of
the width in diffusers), and ``last.*``. Every norm is a zero-centred scale (``1 + w``) in both
layouts, so values move unchanged; only names change, plus the table's reshape. diffusers'
``convert_krea2_transformer_checkpoint_to_diffusers`` does the same renames, and
tests/test_krea2.py checks this table against it.
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import (  # noqa: F401 (the key modules' interface)
    UNET_PREFIX, count_matches, has_keys, renamed_by_table, renamed_lora_modules, strip)
from nodes.checkpoint.z_image_keys import rope_axes

#: ComfyUI's (and diffusers') detection key in the original layout; diffusers' own name for it.
ORIGINAL_MARKER = "txtfusion.projector.weight"
DIFFUSERS_MARKER = "text_fusion.projector.weight"
#: (original, diffusers) name starts, tried in order; the first that matches renames the key.
_STARTS = (("first.", "img_in."), ("tmlp.0.", "time_embed.linear_1."), ("tmlp.2.", "time_embed.linear_2."),
           ("tproj.1.", "time_mod_proj."), ("txtmlp.0.scale", "txt_in.norm.weight"),
           ("txtmlp.1.", "txt_in.linear_1."), ("txtmlp.3.", "txt_in.linear_2."), ("txtfusion.", "text_fusion."),
           ("blocks.", "transformer_blocks."), ("last.linear.", "final_layer.linear."),
           ("last.norm.scale", "final_layer.norm.weight"), ("last.modulation.lin", "final_layer.scale_shift_table"))
#: (original, diffusers) pieces inside a block's names (transformer and text-fusion blocks alike).
_PIECES = ((".attn.wq.", ".attn.to_q."), (".attn.wk.", ".attn.to_k."), (".attn.wv.", ".attn.to_v."),
           (".attn.wo.", ".attn.to_out.0."), (".attn.gate.", ".attn.to_gate."),
           (".attn.qknorm.qnorm.scale", ".attn.norm_q.weight"), (".attn.qknorm.knorm.scale", ".attn.norm_k.weight"),
           (".mlp.", ".ff."), (".prenorm.scale", ".norm1.weight"), (".postnorm.scale", ".norm2.weight"),
           (".mod.lin", ".scale_shift_table"))
_BLOCK_TABLE = re.compile(r"^transformer_blocks\.\d+\.scale_shift_table$")


class KeyMismatch(ValueError):
    """Keys that do not fit the Krea 2 layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, ORIGINAL_MARKER)


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, DIFFUSERS_MARKER)


def _renamed(key: str, forward: bool) -> str:
    """``key`` in the other layout: the name's start first (the final layer's table is no block's),
    then the pieces inside blocks."""
    return renamed_by_table(key, forward, _STARTS, _PIECES)


def to_diffusers_name(key: str) -> str:
    return _renamed(key, True)


def to_original_name(key: str) -> str:
    return _renamed(key, False)


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors (no prefix) under diffusers' names, each block's flat modulation table
    as its six rows. Works on meta tensors and row scales alike (no linear weight changes shape)."""
    foreign = sorted(k for k in state if k.startswith(("transformer_blocks.", "text_fusion.", "img_in.")))
    if foreign:
        raise KeyMismatch(f"unexpected {foreign[:4]}{' ...' if len(foreign) > 4 else ''} (diffusers' names in an "
                          "original-layout file)")
    out = {}
    for key, value in state.items():
        name = to_diffusers_name(key)
        out[name] = value.reshape(6, -1) if _BLOCK_TABLE.match(name) else value
    return out


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names -> the original layout (each block's table flat): what Krea's files hold."""
    return {to_original_name(k): v.reshape(-1) if _BLOCK_TABLE.match(k) else v for k, v in state.items()}


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Krea2Transformer2DModel arguments from original-layout shapes. The rotary axes are not in the
    weights: the release splits its 128-wide heads as (32, 48, 48); other widths keep those proportions."""
    s = strip(dict(shapes))
    try:
        hidden, in_channels = s["first.weight"]
        head = s["blocks.0.attn.qknorm.qnorm.scale"][0]
        kv = s["blocks.0.attn.wk.weight"][0]
        text_dim = s["txtmlp.1.weight"][1]
        text_head = s["txtfusion.layerwise_blocks.0.attn.qknorm.qnorm.scale"][0]
        text_kv = s["txtfusion.layerwise_blocks.0.attn.wk.weight"][0]
        config = dict(
            in_channels=in_channels, num_layers=count_matches(s, r"^blocks\.(\d+)\."), attention_head_dim=head,
            num_attention_heads=hidden // head, num_key_value_heads=kv // head,
            intermediate_size=s["blocks.0.mlp.gate.weight"][0], timestep_embed_dim=s["tmlp.0.weight"][1],
            text_hidden_dim=text_dim, num_text_layers=s[ORIGINAL_MARKER][-1],
            text_num_attention_heads=text_dim // text_head, text_num_key_value_heads=text_kv // text_head,
            text_intermediate_size=s["txtfusion.layerwise_blocks.0.mlp.gate.weight"][0],
            num_layerwise_text_blocks=count_matches(s, r"^txtfusion\.layerwise_blocks\.(\d+)\."),
            num_refiner_text_blocks=count_matches(s, r"^txtfusion\.refiner_blocks\.(\d+)\."))
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    return config | dict(axes_dims_rope=tuple(rope_axes(head)), rope_theta=1000.0, norm_eps=1e-5)


def lora_modules(names: Any) -> dict[str, str]:
    """Original module name -> diffusers weight name, for every linear weight of the diffusers model
    (``names``: its parameter names): LoRAs for Krea 2 are written against the original names
    (``blocks.3.attn.wq``), which rename one to one."""
    return renamed_lora_modules(names, to_original_name)


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> the original name of the same tensor."""
    return {name: to_original_name(name) for name in diffusers_names}
