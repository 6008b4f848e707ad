"""Loading FIBO 2 offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/fibo2_*.safetensors``: bf16, fp8_scaled,
  int8_convrot) under diffusers' names, bare or under ``model.diffusion_model.``
  (nodes.checkpoint.fibo2_keys), built by the flow transformers' one rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from the shapes, int8 / fp8 scales through
  nodes.checkpoint.scaled_fp8, linear weights held as stored).
* Qwen3-VL 4B through CLIPLoader type ``fibo2`` (``qwen3vl_4b*.safetensors``): Krea 2's Qwen3-VL text
  model builder (nodes.checkpoint.krea2_load.build_text_model), the vision tower not read.
* The VAE is FLUX.2's (``flux2-vae.safetensors``, VAELoader: nodes.checkpoint.flux2_vae).
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import fibo2_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles

LABEL = "FIBO 2"


def has_transformer(keys_: Any) -> bool:
    """A FIBO 2 transformer (its Perceiver's gist queries), with or without ComfyUI's prefix."""
    return keys.is_original(keys_)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): one
#: layout under diffusers' names (fibo2_keys: the conversions are the identity), read as the original one.
#: A file with FIBO 2's marker whose other keys do not fit is a CheckpointError naming the file and keys.
FILES = TransformerFiles("BriaFibo2Transformer2DModel", keys, "fibo2", LABEL, is_diffusers=lambda _: False)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout
