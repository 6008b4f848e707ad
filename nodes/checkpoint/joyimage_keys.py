"""JoyImage Edit transformer weights: ComfyUI's file layout and diffusers' JoyImageEditTransformer3DModel.

ComfyUI's ``joyai_image_edit_*.safetensors`` (bf16, fp8_scaled, int8_convrot) name the tensors as
diffusers' class does (``img_in``, ``condition_embedder.{time_embedder,time_proj,text_embedder}``,
``double_blocks.N.{img,txt}_mod.modulate_table``, ``attn.{img,txt}_attn_qkv/_q_norm/_k_norm/_proj``,
``{img,txt}_mlp.net.0.proj`` / ``net.2``, ``proj_out``), with or without ``model.diffusion_model.``
before them. So the layouts are one and the conversion is the identity; what this module adds is the
detection and the config read from the shapes (:func:`transformer_config`).
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint.flux_keys import (  # noqa: F401 (the key modules' interface)
    UNET_PREFIX, count_matches, has_keys, strip)

#: ComfyUI's detection keys (its model_detection reads the JoyImage DiT by these).
MARKERS = ("double_blocks.0.attn.img_attn_q_norm.weight", "condition_embedder.text_embedder.linear_1.weight")
#: The release's rotary split of its 128-wide heads over (frame, row, column); other widths keep the
#: proportions (1/8 to the frame axis, the rest halved; each even).
RELEASE_ROPE = (16, 56, 56)
THETA = 256


class KeyMismatch(ValueError):
    """Keys that do not fit the JoyImage layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, *MARKERS)


def is_diffusers(keys: Any) -> bool:
    """False: diffusers' names are the original ones (module docstring), read by one path."""
    return False


def identity(state: dict[str, Any]) -> dict[str, Any]:
    return dict(state)


def rope_dims(head: int) -> list[int]:
    """The rotary widths of (frame, row, column) for a head of ``head`` channels (:data:`RELEASE_ROPE`)."""
    if head == sum(RELEASE_ROPE):
        return list(RELEASE_ROPE)
    frame = max(2, head // 8 // 2 * 2)
    side = (head - frame) // 2 // 2 * 2
    return [head - 2 * side, side, side]


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """JoyImageEditTransformer3DModel arguments from the shapes (prefix or not)."""
    s = strip(dict(shapes))
    try:
        hidden, in_channels, *patch = s["img_in.weight"]
        head = s[MARKERS[0]][0]
        text_dim = s[MARKERS[1]][1]
        mlp = s["double_blocks.0.img_mlp.net.0.proj.weight"][0]
        out = s["proj_out.weight"][0] // (patch[0] * patch[1] * patch[2])
    except (KeyError, ValueError) as exc:
        raise KeyMismatch(f"missing or misshapen {exc}") from None
    return dict(patch_size=list(patch), in_channels=in_channels, out_channels=out, hidden_size=hidden,
                num_attention_heads=hidden // head, text_dim=text_dim, mlp_width_ratio=mlp / hidden,
                num_layers=count_matches(s, r"^double_blocks\.(\d+)\."), rope_dim_list=rope_dims(head),
                rope_type="rope", theta=THETA)
