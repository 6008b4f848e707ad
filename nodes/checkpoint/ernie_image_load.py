"""Loading ERNIE-Image offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/ernie-image*.safetensors``: bf16, fp8,
  scaled fp8), with or without ``model.diffusion_model.``; diffusers' names are the same
  (nodes.checkpoint.ernie_image_keys). The build is FLUX's rule (nodes.checkpoint.flux_load
  .transformer_from_file: config from the shapes, fp8 scales through nodes.checkpoint.scaled_fp8), or
  straight into disk blocks when the model manager pages it there (:func:`file_layout`).
* Ministral 3 3B through CLIPLoader type ``flux2`` (``ministral-3-3b.safetensors``, its Tekken tokenizer
  inside): nodes.checkpoint.ministral_text, read by nodes.checkpoint.split.
* The VAE is FLUX.2's (``flux2-vae.safetensors``, VAELoader: nodes.checkpoint.flux2_load.build_vae).
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import ernie_image_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles

LABEL = "ERNIE-Image"


def has_transformer(keys_: Any) -> bool:
    """An ERNIE-Image transformer, with or without ComfyUI's prefix."""
    return keys.is_original(keys_)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): its names
#: are the module's own, each tensor its own row in a build straight into disk blocks.
FILES = TransformerFiles("ErnieImageTransformer2DModel", keys, "ernie_image", LABEL, own_names=True)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout
