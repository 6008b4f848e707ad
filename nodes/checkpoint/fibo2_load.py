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

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint import fibo2_keys as keys
from nodes.checkpoint.load import Loaded

LABEL = "FIBO 2"


def has_transformer(keys_: Any) -> bool:
    """A FIBO 2 transformer (its Perceiver's gist queries), with or without ComfyUI's prefix."""
    return keys.is_original(keys_)


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """BriaFibo2Transformer2DModel from a file's tensors (prefix or not, scales beside the weights).
    A file with FIBO 2's marker whose other keys do not fit is a CheckpointError naming the file and keys."""
    from diffusers import BriaFibo2Transformer2DModel

    from nodes.checkpoint.flux_load import transformer_from_file

    return transformer_from_file(state, what, dtype, BriaFibo2Transformer2DModel, LABEL, keys,
                                 keys.original_to_diffusers, keys.diffusers_to_original, lambda _: False)


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's FIBO 2 path (nodes.checkpoint.flow_transformers); ``offload`` as FLUX's."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import fibo2 as fam

    return transformer_file(state, name, dtype, fp8, build_transformer, fam.FAMILY, LABEL, offload, file_layout)


def file_layout(state: Mapping[str, Any], what: str) -> Any:
    """How a FIBO 2 file (prefix stripped) becomes its module, for a build straight into disk blocks."""
    from diffusers import BriaFibo2Transformer2DModel

    from nodes.checkpoint.paged_files import keyed_layout

    return keyed_layout(BriaFibo2Transformer2DModel, LABEL, keys, False)
