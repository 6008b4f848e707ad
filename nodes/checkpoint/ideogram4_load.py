"""Loading Ideogram 4 offline: ComfyUI's split files.

* Each transformer alone (UNETLoader, ``models/diffusion_models/ideogram4_*.safetensors`` and
  ``ideogram4_unconditional_*.safetensors``: one architecture; bf16, fp8_scaled, int8_convrot) in
  ComfyUI's key layout (with or without ``model.diffusion_model.``) or diffusers' in one file; the
  key map is nodes.checkpoint.ideogram4_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from shapes, fp8/int8 row scales following
  the qkv split through nodes.checkpoint.scaled_fp8), or straight into disk blocks when the model
  manager pages it there (:func:`file_layout`, nodes.checkpoint.paged_files).
* Qwen3-VL 8B through CLIPLoader type ``ideogram4`` (``qwen3vl_8b*.safetensors``): the language model
  alone, built by Krea 2's Qwen3-VL builder (nodes.checkpoint.krea2_load.build_text_model; the
  family declares the ``qwen3-vl`` kind, nodes.checkpoint.split reads it).
* The VAE is FLUX.2's (``flux2-vae.safetensors``, VAELoader).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint import ideogram4_keys as keys
from nodes.checkpoint.load import Loaded

LABEL = "Ideogram 4"


def has_transformer(keys_: Any) -> bool:
    """An Ideogram 4 transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """Ideogram4Transformer2DModel from ComfyUI- or diffusers-layout tensors (linear weights held as stored)."""
    from diffusers import Ideogram4Transformer2DModel

    from nodes.checkpoint.flux_load import transformer_from_file

    return transformer_from_file(state, what, dtype, Ideogram4Transformer2DModel, LABEL, keys,
                                 keys.original_to_diffusers, keys.diffusers_to_original, keys.is_diffusers)


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's Ideogram 4 path (nodes.checkpoint.flow_transformers); ``offload`` as FLUX's: a
    transformer the manager pages to disk is built straight into its blocks (:func:`file_layout`)."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import ideogram4 as fam

    return transformer_file(state, name, dtype, fp8, build_transformer, fam.FAMILY, LABEL, offload, file_layout)


def file_layout(state: Mapping[str, Any], what: str) -> Any:
    """How an Ideogram 4 file (prefix stripped) becomes its module, for a build straight into disk blocks
    (nodes.checkpoint.paged_files): ComfyUI's layout through nodes.checkpoint.ideogram4_keys' table, whose
    qkv split keeps each part's rows of the fused tensor; diffusers' layout as it is. diffusers keeps no
    Ideogram 4 module in float32 (no ``_keep_in_fp32_modules``), so there is no last touch (``after``)."""
    from diffusers import Ideogram4Transformer2DModel

    from nodes.checkpoint.paged_files import keyed_layout

    return keyed_layout(Ideogram4Transformer2DModel, LABEL, keys, keys.is_diffusers(state))
