"""HiDream-I1 transformer weights: ComfyUI's files and diffusers' HiDreamImageTransformer2DModel.

ComfyUI's ``hidream_i1_{full,dev,fast}_*.safetensors`` hold the transformer under diffusers' own names
(``double_stream_blocks.N.block.*``, ``caption_projection.N.linear.weight``; diffusers' single-file
converter for HiDream only drops ``model.diffusion_model.``), so one layout serves both, with or without
that prefix, and the conversion is the identity; what this module adds is the detection and the config
read from the shapes (:func:`transformer_config`), the interface of the key modules
(nodes.checkpoint.flow_transformers.TransformerFiles).

The config comes from the shapes where they show it (width, text widths, pooled width, block and
expert counts); the rest is the release's, as ComfyUI's model detection states it: head width 128,
rotary axes (64, 32, 32), patch 2, two of the routed experts active, a 128 x 128 patch grid, and the
Llama layer each block reads (:data:`LLAMA_LAYERS`: 0..31, then the last layer for the other 16 of
the 48 blocks). A model with another block count (the tests' tiny ones) reads layers 0, 1, ... in order.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.flux_keys import (  # noqa: F401 (the key modules' interface)
    UNET_PREFIX, count_matches, has_keys, strip)

LABEL = "HiDream-I1"
MARKER = "caption_projection.0.linear.weight"
BLOCK_MARKER = "double_stream_blocks.0.block.adaLN_modulation.1.bias"
HEAD = 128
PATCH = 2
AXES = (64, 32, 32)
ACTIVE_EXPERTS = 2
MAX_RESOLUTION = (128, 128)
#: The released 48 blocks' Llama layers (32 layers; the last read by the 16 blocks past them).
LLAMA_LAYERS = tuple(range(32)) + (31,) * 16


class KeyMismatch(ValueError):
    """Keys that do not fit the HiDream-I1 layout (names them)."""


def has_transformer(keys: Any) -> bool:
    """A HiDream transformer, with or without ComfyUI's prefix."""
    return has_keys(keys, MARKER, BLOCK_MARKER)


def is_diffusers(keys: Any) -> bool:
    """False: diffusers' names are the files' own (module docstring), read by one path."""
    return False


def transformer_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """HiDreamImageTransformer2DModel's config from the shapes (prefix or not; module docstring). Raises
    KeyError naming a tensor the config needs that the file lacks."""
    shapes = strip(dict(shapes))
    inner, patch_in = shapes["x_embedder.proj.weight"]
    out = shapes["final_layer.linear.weight"][0] // (PATCH * PATCH)
    pooled = shapes["p_embedder.pooled_embedder.linear_1.weight"][1]
    doubles = count_matches(shapes, r"double_stream_blocks\.(\d+)\.")
    singles = count_matches(shapes, r"single_stream_blocks\.(\d+)\.")
    t5 = shapes[f"caption_projection.{doubles + singles}.linear.weight"][1]
    llama = shapes[MARKER][1]
    experts = count_matches(shapes, r"double_stream_blocks\.0\.block\.ff_i\.experts\.(\d+)\.")
    blocks = doubles + singles
    return dict(patch_size=PATCH, in_channels=patch_in // (PATCH * PATCH), out_channels=out, num_layers=doubles,
                num_single_layers=singles, attention_head_dim=HEAD if inner % HEAD == 0 else inner,
                num_attention_heads=max(1, inner // HEAD), caption_channels=[t5, llama], text_emb_dim=pooled,
                num_routed_experts=experts, num_activated_experts=ACTIVE_EXPERTS, axes_dims_rope=AXES,
                max_resolution=MAX_RESOLUTION,
                llama_layers=list(LLAMA_LAYERS) if blocks == len(LLAMA_LAYERS) else list(range(blocks)))
