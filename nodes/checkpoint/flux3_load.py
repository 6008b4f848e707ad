"""Loading FLUX.3 offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/flux3-image-klein*.safetensors``) in
  BFL's key layout (with or without ``model.diffusion_model.``), plain, fp8 or scaled, or in diffusers'
  layout in one file; the key map is nodes.checkpoint.flux3_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from shapes, scales following the renames).
  The flow-map embedder (``ref_time_in``) makes it the step-distilled family
  (nodes.families.flux3_distilled), else the base one (nodes.families.flux3). The q/k norm scales are
  kept in float32 from the file, as diffusers keeps them (``_keep_in_fp32_modules``).
* Qwen3-VL 4B through CLIPLoader type ``flux3`` (``qwen3vl_4b*.safetensors``): its language model,
  built by Krea 2's Qwen3-VL builder (nodes.checkpoint.krea2_load.build_text_model, via
  nodes.checkpoint.split); the vision tower is not read.
* The VAE is FLUX.2's (``flux2-vae.safetensors`` through VAELoader: nodes.checkpoint.flux2_load.build_vae).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint import flux3_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles

LABEL = "FLUX.3"


def has_transformer(keys_: Any) -> bool:
    """A FLUX.3 transformer (base or step-distilled) in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


def norms_in_fp32(model: Any, state: Mapping[str, Any]) -> Any:
    """``model`` with its q/k RMSNorm scales in float32, read again from the file (``state``, either layout),
    whatever the model computes in, as diffusers keeps them (the shared rule,
    nodes.checkpoint.kept_fp32.keep_in_fp32, with FLUX.3's names). Returns ``model``."""
    from nodes.checkpoint.kept_fp32 import keep_in_fp32

    names = keys.original_names([name for name, _ in model.named_parameters()])
    return keep_in_fp32(model, state, lambda name: (name, names.get(name, name)))


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): either
#: layout; the flow-map embedder makes it the distilled family, else the base one.
FILES = TransformerFiles("Flux3Transformer2DModel", keys, "flux3", LABEL, after=norms_in_fp32,
                         family_of=lambda s: "flux3_distilled" if keys.is_distilled(s) else "flux3")
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout
