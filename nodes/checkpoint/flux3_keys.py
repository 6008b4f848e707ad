"""FLUX.3 transformer weights: the original (BFL, ComfyUI's) key layout <-> diffusers' Flux3Transformer2DModel.

FLUX.3 is not FLUX.2 with new sizes: each token mode (the image, the reference images, the text) has
its own input projection (``emb_in.image``, ``emb_in.image_cond``, ``txt_in``), its own stack of
per-mode blocks (``content_mode_blocks.image.N``, ``content_mode_blocks.image_cond.N``,
``txt_mode_blocks.N``) and its own two modulation heads (``early_stream_modulations.<mode>.lin``,
``single_stream_modulations.<mode>.lin``) before the joint ``single_blocks.N``. Inside every block the
names are the same (``q_proj``/``k_proj``/``v_proj``/``attn_out``, ``norm.query_norm.scale``,
``mlp_in``/``mlp_out``), nothing is fused, and only the output adaLN swaps its halves (BFL: shift,
scale; diffusers: scale, shift). The step-distilled (flow-map) release adds ``ref_time_in``, the
embedder of the timestep each step jumps to (diffusers' ``target_timestep_embedder``); training-only
``repa_projectors.*`` are dropped as diffusers' converter drops them.

The rows are in the shape nodes.checkpoint.flux_keys' walkers read (``plan_from``, ``to_original``), so
a mismatching file is a KeyMismatch naming missing and left-over keys; tests/test_flux3.py checks the
table against diffusers' own ``convert_flux3_transformer_checkpoint_to_diffusers``.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.flux_keys import KeyMismatch, has_keys

__all__ = ["KeyMismatch", "pairs", "plan", "original_to_diffusers", "diffusers_to_original", "transformer_config",
           "is_original", "is_diffusers", "is_distilled", "strip"]

#: The markers of either layout (diffusers' single-file detection uses the first).
ORIGINAL_MARKER = "early_stream_modulations.image.lin.weight"
DIFFUSERS_MARKER = "early_stream_modulations.image.linear.weight"
#: The flow-map (step-distilled) embedder in either layout.
DISTILLED_MARKERS = ("ref_time_in.in_layer.weight", "target_timestep_embedder.linear_1.weight")
#: Token modes of the per-mode image blocks and of the modulation heads.
IMAGE_MODES = ("image", "image_cond")
MODES = (*IMAGE_MODES, "txt")
#: Training-only heads some original files carry (not part of the inference model).
TRAINING_ONLY = "repa_projectors."

_TOP = [("txt_in.weight", "context_embedder.weight"),
        ("time_in.in_layer.weight", "timestep_embedder.linear_1.weight"),
        ("time_in.out_layer.weight", "timestep_embedder.linear_2.weight"),
        ("ref_time_in.in_layer.weight", "target_timestep_embedder.linear_1.weight"),
        ("ref_time_in.out_layer.weight", "target_timestep_embedder.linear_2.weight"),
        ("final_layer.image.linear.weight", "proj_out.weight")]
_TOP += [(f"emb_in.{m}.weight", f"x_embedders.{m}.weight") for m in IMAGE_MODES]
_TOP += [(f"{kind}_stream_modulations.{m}.lin.weight", f"{kind}_stream_modulations.{m}.linear.weight")
         for kind in ("early", "single") for m in MODES]
#: Inside every block (per-mode and joint alike).
_BLOCK = [("q_proj.weight", "attn.to_q.weight"), ("k_proj.weight", "attn.to_k.weight"),
          ("v_proj.weight", "attn.to_v.weight"), ("attn_out.weight", "attn.to_out.0.weight"),
          ("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight"),
          ("mlp_in.weight", "ff.linear_in.weight"), ("mlp_out.weight", "ff.linear_out.weight")]
#: (original block-list prefix, diffusers block-list prefix).
_BLOCK_LISTS = [(f"content_mode_blocks.{m}.", f"mode_blocks.{m}.") for m in IMAGE_MODES] + \
    [("txt_mode_blocks.", "txt_mode_blocks."), ("single_blocks.", "single_transformer_blocks.")]
#: Optional in a file: only the step-distilled release has the target-timestep embedder.
OPTIONAL = ("ref_time_in.",)


def is_original(keys: Any) -> bool:
    return has_keys(keys, ORIGINAL_MARKER)


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, DIFFUSERS_MARKER)


def is_distilled(keys: Any) -> bool:
    """The step-distilled (flow-map) FLUX.3: a second timestep embedder, in either layout."""
    return any(has_keys(keys, m) for m in DISTILLED_MARKERS)


def pairs(original_keys: Any, diffusers_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """(original names, diffusers names, how) for every tensor; ``how`` is rename or swap (flux_keys')."""
    rows = [([o], [d], "rename") for o, d in _TOP]
    rows.append((["final_layer.image.adaLN_modulation.1.weight"], ["norm_out.linear.weight"], "swap"))
    for original, diffusers in _BLOCK_LISTS:
        for i in flux_keys._blocks(original_keys, original) or flux_keys._blocks(diffusers_keys, diffusers):
            rows += [([f"{original}{i}.{o}"], [f"{diffusers}{i}.{d}"], "rename") for o, d in _BLOCK]
    return rows


#: ComfyUI's ``model.diffusion_model.`` taken off (nodes.checkpoint.flux_keys.strip).
strip = flux_keys.strip


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(original name, diffusers names, how) for every tensor of an original-layout key set (the
    training-only heads left out). Raises :class:`KeyMismatch` naming missing and left-over keys."""
    return flux_keys.plan_from(pairs, [k for k in keys if not k.startswith(TRAINING_ONLY)], OPTIONAL)


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers-layout tensors from original-layout ones (``model.diffusion_model.`` stripped first;
    nothing is fused, so no width is needed)."""
    return flux_keys.to_diffusers(state, plan, hidden=1)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors from a Flux3Transformer2DModel state dict (the inverse; tests write files with it)."""
    return flux_keys.to_original(state, pairs)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Flux3Transformer2DModel arguments from original-layout shapes. The rotary axes are not in the
    weights: the release splits its 128-wide heads into four equal axes (32 each), kept at other widths."""
    s = strip(dict(shapes))
    try:
        hidden, in_channels = s["emb_in.image.weight"]
        head = s["single_blocks.0.norm.query_norm.scale"][0]
        return dict(in_channels=in_channels, cond_in_channels=s["emb_in.image_cond.weight"][1],
                    num_layers=len(flux_keys._blocks(s, "txt_mode_blocks.")),
                    num_single_layers=len(flux_keys._blocks(s, "single_blocks.")),
                    attention_head_dim=head, num_attention_heads=hidden // head,
                    joint_attention_dim=s["txt_in.weight"][1], timestep_channels=s["time_in.in_layer.weight"][1],
                    mlp_ratio=s["single_blocks.0.mlp_in.weight"][0] / 2 / hidden, axes_dims_rope=(head // 4,) * 4,
                    flow_map="ref_time_in.in_layer.weight" in s)
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> the original name of the same tensor (LoRA and merge names)."""
    return flux_keys.original_names(diffusers_names, pairs)


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The original layout's module names (BFL's and ComfyUI's LoRAs), one to one."""
    return flux_keys.lora_modules(shapes, pairs)
