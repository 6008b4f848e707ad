"""FLUX.2 transformer weights: the original (BFL) key layout <-> diffusers' Flux2Transformer2DModel.

FLUX.2 keeps FLUX.1's block names (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``)
but moves the modulation out of the blocks into three shared layers
(``double_stream_modulation_img``/``_txt``, ``single_stream_modulation``), has no biases, no
pooled text (``vector_in``) and, in [klein], no guidance embedder. diffusers keeps a single block's
fused ``linear1`` fused (``attn.to_qkv_mlp_proj``) and splits only the double blocks' ``qkv``.
The rows are in the shape :func:`nodes.checkpoint.flux_keys._pairs` uses, so FLUX's conversion,
LoRA and merge-name helpers run on this table unchanged; tests/test_flux2_loading.py checks it
against diffusers' own converter (``convert_flux2_transformer_checkpoint_to_diffusers``).
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.flux_keys import KeyMismatch

__all__ = ["KeyMismatch", "pairs", "plan", "original_to_diffusers", "diffusers_to_original", "transformer_config"]

_TOP = [
    ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    ("single_stream_modulation.lin", "single_stream_modulation.linear"),
    ("final_layer.linear", "proj_out"),
]
_DOUBLE = [
    ("img_attn.proj.weight", "attn.to_out.0.weight"), ("txt_attn.proj.weight", "attn.to_add_out.weight"),
    ("img_mlp.0.weight", "ff.linear_in.weight"), ("img_mlp.2.weight", "ff.linear_out.weight"),
    ("txt_mlp.0.weight", "ff_context.linear_in.weight"), ("txt_mlp.2.weight", "ff_context.linear_out.weight"),
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"), ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [
    ("linear1.weight", "attn.to_qkv_mlp_proj.weight"), ("linear2.weight", "attn.to_out.weight"),
    ("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight"),
]
#: Optional in a file: [klein] has no guidance embedder ([dev] has; the loader refuses [dev] by it).
OPTIONAL = ("guidance_in.",)


def pairs(original_keys: Any, diffusers_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """(original names, diffusers names, how) for every tensor; ``how`` as in flux_keys."""
    double = flux_keys._blocks(original_keys, "double_blocks.") or \
        flux_keys._blocks(diffusers_keys, "transformer_blocks.")
    single = flux_keys._blocks(original_keys, "single_blocks.") or \
        flux_keys._blocks(diffusers_keys, "single_transformer_blocks.")
    rows = [([f"{o}.weight"], [f"{d}.weight"], "rename") for o, d in _TOP]
    rows.append((["final_layer.adaLN_modulation.1.weight"], ["norm_out.linear.weight"], "swap"))
    for i in double:
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rows += [([o + x], [d + y], "rename") for x, y in _DOUBLE]
        rows.append(([f"{o}img_attn.qkv.weight"], [f"{d}attn.to_{q}.weight" for q in "qkv"], "fuse"))
        rows.append(([f"{o}txt_attn.qkv.weight"], [f"{d}attn.add_{q}_proj.weight" for q in "qkv"], "fuse"))
    for i in single:
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rows += [([o + x], [d + y], "rename") for x, y in _SINGLE]
    return rows


#: ComfyUI's ``model.diffusion_model.`` taken off (nodes.checkpoint.flux_keys.strip).
strip = flux_keys.strip


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(original name, diffusers names, how) for every tensor of an original-layout key set (FLUX's
    walker, nodes.checkpoint.flux_keys.plan_from, on this table).
    Raises :class:`~nodes.checkpoint.flux_keys.KeyMismatch` naming missing and left-over keys."""
    return flux_keys.plan_from(pairs, keys, OPTIONAL)


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers-layout tensors from original-layout ones (``model.diffusion_model.`` stripped first)."""
    return flux_keys.to_diffusers(state, plan)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors from a Flux2Transformer2DModel state dict (the inverse; tests write files with it)."""
    return flux_keys.to_original(state, pairs)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Flux2Transformer2DModel arguments from original-layout shapes. The rotary axes are not in the
    weights: the releases split a 128-wide head into four equal axes (32 each), kept at other widths."""
    s = strip(dict(shapes))
    hidden, in_channels = s["img_in.weight"]
    head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return dict(patch_size=1, in_channels=in_channels, out_channels=None,
                num_layers=len(flux_keys._blocks(s, "double_blocks.")),
                num_single_layers=len(flux_keys._blocks(s, "single_blocks.")),
                attention_head_dim=head, num_attention_heads=hidden // head, joint_attention_dim=s["txt_in.weight"][1],
                timestep_guidance_channels=s["time_in.in_layer.weight"][1],
                mlp_ratio=s["double_blocks.0.img_mlp.0.weight"][0] / 2 / hidden,
                axes_dims_rope=(head // 4,) * 4, guidance_embeds="guidance_in.in_layer.weight" in s)
