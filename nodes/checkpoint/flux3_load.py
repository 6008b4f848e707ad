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
* A diffusers folder (the modular pipelines' ``save_pretrained``: ``modular_model_index.json``, transformer/,
  text_encoder/ (Qwen3-VL), vae/, tokenizer/) through CheckpointLoaderSimple (:func:`load_folder`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
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


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is FLUX.3's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Any:
    """A diffusers FLUX.3 folder, base or step-distilled (its transformer config's ``flow_map``): FLUX.2's
    VAE and folder rule (nodes.checkpoint.flux2_load.vae_and_text_encoder), Qwen3-VL's language model as
    CLIPLoader type flux3 builds it, the folder's tokenizer (else Kiln's Qwen3 one), the q/k norm scales
    in float32 from ``transformer/``'s files, and the family's constant shift unless a ``scheduler/``
    says otherwise."""
    from diffusers import Flux3Transformer2DModel

    from nodes.checkpoint import flux2_load
    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.krea2_load import build_text_model
    from nodes.families import flux3, flux3_distilled

    try:
        distilled = bool(json.loads((path / "transformer" / "config.json").read_text()).get("flow_map", False))
    except (OSError, ValueError):
        distilled = False
    found = folder_state(path / "transformer", dtype)
    files = {} if found is None else found[1]
    return load_pipeline_folder(
        path, dtype, offload, (flux3_distilled if distilled else flux3).FAMILY, LABEL, Flux3Transformer2DModel,
        lambda: flux2_load.vae_and_text_encoder(
            path, dtype, lambda state, folder, dt: build_text_model(state, f"{folder.name}/text_encoder", dt)),
        lambda: flux2_load.qwen3_folder_tokenizer(path), latent_from_vae=False,
        ready=lambda model: norms_in_fp32(model, files), ready_in_blocks=True)
