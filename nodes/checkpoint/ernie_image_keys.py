"""ERNIE-Image transformer weights: ComfyUI's file layout and diffusers' ErnieImageTransformer2DModel.

Comfy-Org's ``ernie-image*.safetensors`` name the single-stream DiT as diffusers' class does
(``x_embedder.proj``, ``text_proj``, ``time_embedding.linear_1/2``, ``adaLN_modulation.1``,
``layers.N.{adaLN_sa_ln, self_attention.{to_q,to_k,to_v,norm_q,norm_k,to_out.0}, adaLN_mlp_ln,
mlp.{gate_proj,up_proj,linear_fc2}}``, ``final_norm.linear``, ``final_linear``), with or without
``model.diffusion_model.`` before them: one layout, so the conversion is the identity. This module adds
the detection and the config read from the shapes (:func:`transformer_config`).
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import UNET_PREFIX, has_keys, strip  # noqa: F401 (the key modules' interface)

#: Keys only ERNIE-Image's DiT has (its shared adaLN blocks), in both layouts.
MARKERS = ("layers.0.adaLN_sa_ln.weight", "layers.0.self_attention.norm_q.weight", "final_norm.linear.weight")
#: The release's rotary split of its 128-wide heads over (text position, row, column), and its theta.
RELEASE_ROPE = (32, 48, 48)
THETA = 256


class KeyMismatch(ValueError):
    """Keys that do not fit the ERNIE-Image layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, *MARKERS)


def is_diffusers(keys: Any) -> bool:
    """False: diffusers' names are ComfyUI's (module docstring), read by one path."""
    return False


def rope_axes(head: int) -> list[int]:
    """The rotary widths of the three position axes for heads ``head`` wide: the release's for 128, else
    the same proportions (1/4, 3/8, 3/8), each even."""
    if head == sum(RELEASE_ROPE):
        return list(RELEASE_ROPE)
    side = head * 3 // 8 // 2 * 2
    return [head - 2 * side, side, side]


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """ErnieImageTransformer2DModel arguments from the shapes (prefix or not)."""
    s = strip(dict(shapes))
    try:
        hidden, in_channels, patch, _ = s["x_embedder.proj.weight"]
        head = s["layers.0.self_attention.norm_q.weight"][0]
        ffn = s["layers.0.mlp.gate_proj.weight"][0]
        out = s["final_linear.weight"][0] // (patch * patch)
    except (KeyError, ValueError) as exc:
        raise KeyMismatch(f"missing or misshapen {exc}") from None
    text = s["text_proj.weight"][1] if "text_proj.weight" in s else hidden
    layers = len({m.group(1) for k in s for m in [re.match(r"layers\.(\d+)\.", k)] if m})
    return dict(hidden_size=hidden, num_attention_heads=hidden // head, num_layers=layers, ffn_hidden_size=ffn,
                in_channels=in_channels, out_channels=out, patch_size=patch, text_in_dim=text, rope_theta=THETA,
                rope_axes_dim=tuple(rope_axes(head)), eps=1e-6, qk_layernorm=True)
