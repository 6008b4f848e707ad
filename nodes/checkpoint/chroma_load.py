"""Loading Chroma offline: ComfyUI's split files and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/chroma*.safetensors``) in the
  original key layout (with or without ``model.diffusion_model.``) or diffusers'; the key map
  is nodes.checkpoint.chroma_keys. The T5-XXL file comes through CLIPLoader (type ``chroma``,
  nodes.checkpoint.split) and ``ae.safetensors`` through VAELoader, both as for FLUX.
* diffusers folders (``ChromaPipeline.save_pretrained``: ``transformer/``, ``text_encoder/`` (T5),
  ``tokenizer/``, ``vae/``, ``scheduler/``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import chroma_keys
from nodes.checkpoint.load import CheckpointError, Loaded
from nodes.checkpoint.tensors import plain
from nodes.families import chroma as fam

#: diffusers' layout of the approximator (the original names its layers in_layer / out_layer).
DIFFUSERS_MARKER = "distilled_guidance_layer.layers.0.linear_1.weight"
#: Chroma1-Radiance's pixel-space head (ComfyUI's chroma_radiance), which Kiln does not build.
RADIANCE = "nerf_"


def has_chroma_transformer(shapes: Any) -> bool:
    return fam.FAMILY.claims_unet(shapes)


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """ChromaTransformer2DModel from original- or diffusers-layout tensors, by FLUX's rule
    (nodes.checkpoint.flux_load.transformer_from_original) on Chroma's key table."""
    from diffusers import ChromaTransformer2DModel

    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.flux_load import transformer_from_original

    state, scales = scaled_fp8.take(chroma_keys.strip(dict(state)), what)
    if any(k.startswith(RADIANCE) for k in state):
        raise CheckpointError(f"{what} is Chroma1-Radiance (pixel-space Chroma: {RADIANCE}* keys, no VAE latents); "
                              "Kiln runs the latent Chroma models (Chroma1-HD, Chroma1-Base) only")
    diffusers = DIFFUSERS_MARKER in state
    return transformer_from_original(dict(state), scales, what, dtype, ChromaTransformer2DModel, "Chroma", chroma_keys,
                                     chroma_keys.original_to_diffusers,
                                     chroma_keys.diffusers_to_original if diffusers else None)


def _info(transformer: Any, fmt: str) -> dict[str, Any]:
    """The loader's info, as FLUX's: the weights held as stored are named for the loader's message."""
    from nodes.checkpoint.flux_load import _held_note
    from nodes.runtime.fp8 import fp8_bytes

    return {"format": fmt, "prediction_type": "flow", "prediction_reason": "flow matching (Chroma)",
            "fp8": fp8_bytes(transformer) > 0, **_held_note(transformer)}


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "") -> Loaded:
    """UNETLoader's Chroma path; ``fp8`` (a torch dtype name) stores the linear weights in that 8-bit float."""
    from nodes.checkpoint.scaled_fp8 import is_scaled

    state = plain(state)
    if fp8 and not is_scaled(state):  # as ComfyUI: a scaled file keeps its own storage
        import torch

        target = getattr(torch, fp8)
        state = {k: v.to(target) if v.ndim == 2 and k.endswith(".weight") and v.is_floating_point() else v
                 for k, v in state.items()}
    transformer = build_transformer(state, name, dtype)
    family = fam.FAMILY
    return Loaded(family=family, scheduler_config=family.scheduler_config(), latent=family.latent,
                  modules={"unet": transformer}, info=_info(transformer, "unet"))


def is_chroma_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Chroma's (its config names the class)."""
    config = path / "transformer" / "config.json"
    if not (path.is_dir() and (path / "model_index.json").is_file() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "ChromaTransformer2DModel"
    except (OSError, ValueError):
        return False


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Chroma pipeline folder; T5 and the transformer held as stored, as FLUX's folders."""
    import dataclasses

    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import T5TokenizerFast

    from nodes.checkpoint.flux_load import _folder_t5
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.load import quiet_progress
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.runtime.measure import module_bytes

    quiet_progress()
    try:
        modules = {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                   "text_encoder": _folder_t5(path / "text_encoder", dtype)}
        besides = sum(module_bytes(m) for m in modules.values())
        modules["unet"] = folder_component(path / "transformer", ChromaTransformer2DModel, dtype, offload, besides,
                                           as_stored=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: not a loadable diffusers Chroma folder ({exc})") from exc
    for m in modules.values():
        m.eval()
        m.requires_grad_(False)
    tokenizer = T5TokenizerFast.from_pretrained(str(path), subfolder="tokenizer", local_files_only=True) \
        if (path / "tokenizer").is_dir() else t5_tokenizer()
    family = fam.FAMILY
    config = family.scheduler_config()
    sched_file = path / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        config.update({k: v for k, v in json.loads(sched_file.read_text()).items() if not k.startswith("_")})
    vae_cfg = modules["vae"].config
    latent = dataclasses.replace(family.latent, scale=float(vae_cfg.scaling_factor),
                                 shift=float(getattr(vae_cfg, "shift_factor", None) or 0.0))
    return Loaded(family=family, scheduler_config=config, latent=latent, modules=modules,
                  tokenizers={"tokenizer": tokenizer}, info=_info(modules["unet"], "diffusers"))
