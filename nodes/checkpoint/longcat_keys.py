"""LongCat-Image transformer weights: the original (FLUX-style) key layout <-> diffusers' LongCatImageTransformer2DModel.

LongCat-Image's DiT is FLUX.1's double/single-stream transformer without the pooled-text and guidance
embedders: ComfyUI's ``longcat_image*.safetensors`` hold BFL's names (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ``time_in``, ``txt_in`` of Qwen2.5-VL's 3584 width, ``final_layer``) and no
``vector_in`` / ``guidance_in``. diffusers names the blocks as FluxTransformer2DModel does and the time
embedder ``time_embed.timestep_embedder``. So the table is FLUX's (nodes.checkpoint.flux_keys, fused
q/k/v split by width, the final modulation's halves swapped) with the time embedder renamed and the two
FLUX-only embedders left out; one walker converts both ways.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.flux_keys import UNET_PREFIX, KeyMismatch, has_keys, strip  # noqa: F401 (the key modules' interface)

#: Original-layout keys: FLUX's blocks (their GELU MLP: Ovis-Image's gated one has ``gate_proj``) and time
#: embedder, with no pooled-text embedder (``vector_in``).
ORIGINAL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight", "time_in.in_layer.weight")
FLUX_ONLY = "vector_in.in_layer.weight"
#: diffusers' layout: its own time embedder beside FLUX's block names.
DIFFUSERS_MARKERS = ("time_embed.timestep_embedder.linear_1.weight", "transformer_blocks.0.attn.add_q_proj.weight")
_FLUX_TIME, _OWN_TIME = "time_text_embed.timestep_embedder.", "time_embed.timestep_embedder."
_LEFT_OUT = ("vector_in.", "guidance_in.")


def _pairs(original_keys: Any, diffusers_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """FLUX's rows (flux_keys._pairs) without the pooled/guidance embedders, the time embedder renamed."""
    rows = []
    for original, diffusers, how in flux_keys._pairs(original_keys, diffusers_keys):
        if original[0].startswith(_LEFT_OUT):
            continue
        rows.append((original, [_OWN_TIME + d[len(_FLUX_TIME):] if d.startswith(_FLUX_TIME) else d
                                for d in diffusers], how))
    return rows


def is_original(keys: Any) -> bool:
    keys = set(keys)
    return has_keys(keys, *ORIGINAL_MARKERS) and not has_keys(keys, FLUX_ONLY)


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, *DIFFUSERS_MARKERS)


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(original name, diffusers names, how) for every tensor; KeyMismatch names missing and extra keys."""
    return flux_keys.plan_from(_pairs, keys)


def original_to_diffusers(state: dict[str, Any], hidden: int | None = None) -> dict[str, Any]:
    return flux_keys.to_diffusers(state, plan, hidden)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    return flux_keys.to_original(state, _pairs)


def original_names(diffusers_names: Any) -> dict[str, str]:
    return flux_keys.original_names(diffusers_names, _pairs)


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Original module name -> the diffusers weights it covers (FLUX's rule on this table)."""
    return flux_keys.lora_modules(shapes, _pairs)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """LongCatImageTransformer2DModel arguments from original-layout shapes. The rotary axes are not in the
    weights: the release splits its 128-wide heads as (16, 56, 56), FLUX's proportions, kept at other widths."""
    s = strip(dict(shapes))
    try:
        hidden, in_channels = s["img_in.weight"]
        head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        text = s["txt_in.weight"][1]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    return dict(patch_size=1, in_channels=in_channels, num_layers=len(flux_keys._blocks(s, "double_blocks.")),
                num_single_layers=len(flux_keys._blocks(s, "single_blocks.")), attention_head_dim=head,
                num_attention_heads=hidden // head, joint_attention_dim=text, pooled_projection_dim=text,
                axes_dims_rope=[head // 8, head * 7 // 16, head * 7 // 16])
