"""Loading HiDream-I1's transformer offline: ComfyUI's split file (UNETLoader).

ComfyUI's ``hidream_i1_{full,dev,fast}_*.safetensors`` hold the transformer under diffusers' own names
(``double_stream_blocks.N.block.*``, ``caption_projection.N.linear.weight``; diffusers' single-file
converter for HiDream only drops ``model.diffusion_model.``), so one file layout serves both, with or
without that prefix. fp8 and ComfyUI's scaled fp8 files load through nodes.checkpoint.scaled_fp8.

The config comes from the shapes where they show it (width, text widths, pooled width, block and
expert counts); the rest is the release's, as ComfyUI's model detection states it: head width 128,
rotary axes (64, 32, 32), patch 2, two of the routed experts active, a 128 x 128 patch grid, and the
Llama layer each block reads (:data:`LLAMA_LAYERS`: 0..31, then the last layer for the other 16 of
the 48 blocks). A model with another block count (the tests' tiny ones) reads layers 0, 1, ... in order.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError, Loaded, _empty

LABEL = "HiDream-I1"
MARKER = "caption_projection.0.linear.weight"
BLOCK_MARKER = "double_stream_blocks.0.block.adaLN_modulation.1.bias"
PREFIX = "model.diffusion_model."
HEAD = 128
PATCH = 2
AXES = (64, 32, 32)
ACTIVE_EXPERTS = 2
MAX_RESOLUTION = (128, 128)
#: The released 48 blocks' Llama layers (32 layers; the last read by the 16 blocks past them).
LLAMA_LAYERS = tuple(range(32)) + (31,) * 16


def has_transformer(keys: Any) -> bool:
    """A HiDream transformer, with or without ComfyUI's prefix."""
    keys = set(keys)
    return any(p + MARKER in keys and p + BLOCK_MARKER in keys for p in ("", PREFIX))


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes for m in [rx.match(k)] if m})


def transformer_config(shapes: Mapping[str, tuple], what: str) -> dict[str, Any]:
    """HiDreamImageTransformer2DModel's config from prefix-free shapes (module docstring)."""
    try:
        inner, patch_in = shapes["x_embedder.proj.weight"]
        out = shapes["final_layer.linear.weight"][0] // (PATCH * PATCH)
        pooled = shapes["p_embedder.pooled_embedder.linear_1.weight"][1]
        doubles = _count(shapes, r"double_stream_blocks\.(\d+)\.")
        singles = _count(shapes, r"single_stream_blocks\.(\d+)\.")
        t5 = shapes[f"caption_projection.{doubles + singles}.linear.weight"][1]
        llama = shapes["caption_projection.0.linear.weight"][1]
    except KeyError as exc:
        raise CheckpointError(f"{what}: not a whole {LABEL} transformer ({exc} is missing)") from None
    experts = _count(shapes, r"double_stream_blocks\.0\.block\.ff_i\.experts\.(\d+)\.")
    blocks = doubles + singles
    return dict(patch_size=PATCH, in_channels=patch_in // (PATCH * PATCH), out_channels=out, num_layers=doubles,
                num_single_layers=singles, attention_head_dim=HEAD if inner % HEAD == 0 else inner,
                num_attention_heads=max(1, inner // HEAD), caption_channels=[t5, llama], text_emb_dim=pooled,
                num_routed_experts=experts, num_activated_experts=ACTIVE_EXPERTS, axes_dims_rope=AXES,
                max_resolution=MAX_RESOLUTION,
                llama_layers=list(LLAMA_LAYERS) if blocks == len(LLAMA_LAYERS) else list(range(blocks)))


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """HiDreamImageTransformer2DModel from a file's tensors (prefix dropped; linear weights held as stored)."""
    from diffusers import HiDreamImageTransformer2DModel

    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.paged_files import strip
    from nodes.checkpoint.tensors import shapes_of

    kept, scales = scaled_fp8.take(strip(state), what)
    model = _empty(HiDreamImageTransformer2DModel, transformer_config(shapes_of(kept), what))
    model = scaled_fp8.fill_as_stored(model, kept, scales, dtype, what, f"{LABEL} transformer ({what})")
    return model.eval()


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's HiDream path (nodes.checkpoint.flow_transformers), built whole."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import hidream as fam

    return transformer_file(state, name, dtype, fp8, build_transformer, fam.FAMILY, LABEL, offload)
