"""Chroma transformer weights: the original key layout <-> diffusers' ChromaTransformer2DModel.

Chroma's original files are FLUX's layout (nodes.checkpoint.flux_keys) without FLUX's
modulation (``*_mod.lin``, ``modulation.lin``, ``time_in``, ``vector_in``, ``guidance_in``,
the final ``adaLN_modulation``), plus the approximator ``distilled_guidance_layer.*`` that
computes every block's modulation. diffusers' ``convert_chroma_transformer_checkpoint_to_
diffusers`` assumes the released width (3072) when it splits the single blocks' fused
projection, as its FLUX converter does, so this map reuses FLUX's table (widths from the
tensors) and adds the approximator's renames; tests/test_chroma_loading.py checks it against
diffusers' converter on a released-width layout.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.flux_keys import KeyMismatch  # noqa: F401  (the loader catches keys.KeyMismatch)

#: FLUX tensors Chroma has none of (its approximator gives the modulation instead).
_FLUX_ONLY = ("time_in.", "vector_in.", "guidance_in.", "final_layer.adaLN_modulation.")
_FLUX_ONLY_IN_BLOCKS = (".img_mod.lin.", ".txt_mod.lin.", ".modulation.lin.")
APPROXIMATOR = "distilled_guidance_layer."


def _layers(keys: Any) -> list[int]:
    prefix = APPROXIMATOR + "norms."
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def pairs(original_keys: Any, diffusers_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """(original names, diffusers names, how) for every tensor; ``how`` as in flux_keys."""
    rows = [row for row in flux_keys._pairs(original_keys, diffusers_keys)
            if not row[0][0].startswith(_FLUX_ONLY) and not any(m in row[0][0] for m in _FLUX_ONLY_IN_BLOCKS)]
    a = APPROXIMATOR
    for suffix in ("weight", "bias"):
        rows += [([f"{a}{p}.{suffix}"], [f"{a}{p}.{suffix}"], "rename") for p in ("in_proj", "out_proj")]
        for i in _layers(original_keys) or _layers(diffusers_keys):
            rows += [([f"{a}layers.{i}.{o}.{suffix}"], [f"{a}layers.{i}.{d}.{suffix}"], "rename")
                     for o, d in (("in_layer", "linear_1"), ("out_layer", "linear_2"))]
    for i in _layers(original_keys) or _layers(diffusers_keys):
        rows.append(([f"{a}norms.{i}.scale"], [f"{a}norms.{i}.weight"], "rename"))
    return rows


#: ComfyUI's ``model.diffusion_model.`` taken off (nodes.checkpoint.flux_keys.strip).
strip = flux_keys.strip


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(original name, diffusers names, how) for every tensor of an original-layout key set (FLUX's
    walker, nodes.checkpoint.flux_keys.plan_from, on this table).
    Raises :class:`~nodes.checkpoint.flux_keys.KeyMismatch` naming missing and left-over keys."""
    return flux_keys.plan_from(pairs, keys)


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers-layout tensors from original-layout ones (``model.diffusion_model.`` stripped first)."""
    return flux_keys.to_diffusers(state, plan)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors from a ChromaTransformer2DModel state dict (the inverse)."""
    return flux_keys.to_original(state, pairs)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """ChromaTransformer2DModel arguments from original-layout shapes (rotary axes as FLUX's rule)."""
    s = strip(dict(shapes))
    hidden, in_channels = s["img_in.weight"]
    head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    approx_hidden, approx_in = s[APPROXIMATOR + "in_proj.weight"]
    return dict(patch_size=1, in_channels=in_channels, out_channels=None,
                num_layers=len(flux_keys._blocks(s, "double_blocks.")),
                num_single_layers=len(flux_keys._blocks(s, "single_blocks.")),
                attention_head_dim=head, num_attention_heads=hidden // head, joint_attention_dim=s["txt_in.weight"][1],
                axes_dims_rope=(head // 8, head * 7 // 16, head * 7 // 16),
                approximator_num_channels=approx_in, approximator_hidden_dim=approx_hidden,
                approximator_layers=len(_layers(s)))
