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

from typing import Any

from nodes.checkpoint import ideogram4_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles

LABEL = "Ideogram 4"


def has_transformer(keys_: Any) -> bool:
    """An Ideogram 4 transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): either
#: layout; in a build straight into disk blocks ideogram4_keys' qkv split keeps each part's rows of the fused
#: tensor. diffusers keeps no Ideogram 4 module in float32 (no ``_keep_in_fp32_modules``): no ``after``.
FILES = TransformerFiles("Ideogram4Transformer2DModel", keys, "ideogram4", LABEL)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout
