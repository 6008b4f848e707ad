"""Loading Chroma1-Radiance offline: ComfyUI's split transformer file through UNETLoader.

The file (``models/diffusion_models/chroma-radiance*.safetensors``, with or without ``model.diffusion_model.``)
is read by nodes.checkpoint.chroma_radiance_keys into nodes.checkpoint.chroma_radiance_net's module; the
T5-XXL comes through CLIPLoader type ``chroma`` as for Chroma, and VAELoader's ``pixel_space`` is the VAE
(nodes.checkpoint.pixel_space). There is no diffusers pipeline for it, so no folder layout either.
"""
from __future__ import annotations

from typing import Any, Mapping

from nodes.checkpoint import chroma_radiance_keys as keys
from nodes.checkpoint.flow_transformers import transformer_file
from nodes.checkpoint.load import Loaded

LABEL = "Chroma1-Radiance"


def has_transformer(shapes: Any) -> bool:
    """ComfyUI's rule: the first NeRF block's norm, in either spelling of the prefix."""
    return keys.MARKER in shapes or "model.diffusion_model." + keys.MARKER in shapes


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """The module from a file's tensors (FLUX's shared rule, nodes.checkpoint.flux_load.transformer_from_file:
    fp8 scales taken, linear weights held as stored, key mismatches a CheckpointError naming the keys)."""
    from nodes.checkpoint.chroma_radiance_net import ChromaRadianceTransformer
    from nodes.checkpoint.flux_load import transformer_from_file

    return transformer_from_file(state, what, dtype, ChromaRadianceTransformer, LABEL, keys,
                                 keys.original_to_diffusers, keys.diffusers_to_original, lambda s: False)


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's path (nodes.checkpoint.flow_transformers.transformer_file; built whole, never paged
    straight to disk: no block layout is declared for this module)."""
    from nodes.families import chroma_radiance

    return transformer_file(state, name, dtype, fp8, build_transformer, chroma_radiance.FAMILY, LABEL, offload)
