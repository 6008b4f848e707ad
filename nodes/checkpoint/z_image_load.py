"""Loading Z-Image offline: ComfyUI's split files and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/z_image_turbo_bf16.safetensors``) in
  the original key layout (with or without ``model.diffusion_model.``) or diffusers' in one file; the
  key map is nodes.checkpoint.z_image_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_original: config from shapes, fp8 scales following).
* Qwen3-4B through CLIPLoader (type ``lumina2``, as ComfyUI's template: nodes.checkpoint.split and
  nodes.checkpoint.qwen3_text), ``ae.safetensors`` (FLUX.1's VAE) through VAELoader.
* diffusers folders (``ZImagePipeline.save_pretrained``: ``transformer/``, ``text_encoder/`` (Qwen3),
  ``tokenizer/``, ``vae/``, ``scheduler/``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import z_image_keys as keys
from nodes.checkpoint.load import CheckpointError, Loaded
from nodes.checkpoint.flow_transformers import flow_info, is_pipeline_folder, transformer_file
from nodes.checkpoint.tensors import plain

LABEL = "Z-Image"


def has_z_image_transformer(shapes: Any) -> bool:
    """A Z-Image NextDiT in either layout (pad tokens included: Lumina 2 has none)."""
    return (keys.is_original(shapes) or keys.is_diffusers(shapes)) and keys.has_pad_tokens(shapes)


def is_lumina2(shapes: Any) -> bool:
    """The same NextDiT layout without Z-Image's pad tokens: Lumina Image 2.0, which Kiln does not run."""
    return keys.is_original(shapes) and not keys.has_pad_tokens(shapes)


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """ZImageTransformer2DModel from original- or diffusers-layout tensors (linear weights held as stored)."""
    from diffusers import ZImageTransformer2DModel

    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.flux_load import transformer_from_original

    state, scales = scaled_fp8.take(keys.strip(dict(state)), what)
    diffusers = keys.is_diffusers(state)
    model = transformer_from_original(dict(state), scales, what, dtype, ZImageTransformer2DModel, LABEL, keys,
                                      keys.original_to_diffusers, keys.diffusers_to_original if diffusers else None)
    return time_embedder_in_compute_dtype(model)


def time_embedder_in_compute_dtype(model: Any) -> Any:
    """``model`` with its timestep embedder's linears held in the compute dtype, as plain Linear layers.

    diffusers' Z-Image TimestepEmbedder casts the sinusoidal time features to its first linear's weight
    dtype before the MLP: a weight kept fp8 would fail there, one kept bf16 would round the time where
    diffusers keeps it (it leaves ``t_embedder`` out of layer-wise casting for that reason). The values
    are those the per-call cast (times any fp8 scale) gives, so nothing else changes; a few KB.
    Returns ``model``."""
    import torch

    from nodes.runtime.fp8 import compute_dtype, effective_weight

    dtype = compute_dtype(model)
    for layer in model.t_embedder.modules():
        if not isinstance(layer, torch.nn.Linear) or layer.weight.is_meta or layer.weight.numel() == 0:
            continue
        weight = effective_weight(layer, dtype).detach()
        layer._buffers.pop("kiln_scale", None)
        vars(layer).pop("kiln_rotation", None)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            layer.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        layer.__class__ = torch.nn.Linear
    return model


def _info(transformer: Any, fmt: str) -> dict[str, Any]:
    return flow_info(transformer, fmt, "Z-Image")


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "") -> Loaded:
    """UNETLoader's Z-Image path (nodes.checkpoint.flow_transformers)."""
    from nodes.families import z_image as fam

    return transformer_file(state, name, dtype, fp8, build_transformer, fam.FAMILY, "Z-Image")


def is_z_image_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Z-Image's (its config names the class)."""
    return is_pipeline_folder(path, "ZImageTransformer2DModel")


def _folder_qwen3(folder: Path, dtype: Any) -> Any:
    """The folder's Qwen3 (``text_encoder/``) through nodes.checkpoint.qwen3_text with its own config."""
    from transformers import Qwen3Config

    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.load import reading
    from nodes.checkpoint.qwen3_text import build_qwen3

    found = folder_state(folder, dtype)
    if found is None:
        raise CheckpointError(f"{folder.parent.name}/{folder.name}: no .safetensors weights (Kiln reads a Z-Image "
                              "folder's Qwen3 from safetensors files)")
    with reading(found[0]):
        return build_qwen3(found[1], f"{folder.parent.name}/{folder.name}", dtype, Qwen3Config.from_pretrained(str(folder)))


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Z-Image pipeline folder; Qwen3 and the transformer held as stored, as from split files."""
    import dataclasses

    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.load import quiet_progress
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.families import z_image as fam
    from nodes.runtime.measure import module_bytes

    quiet_progress()
    try:
        modules = {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                   "text_encoder": _folder_qwen3(path / "text_encoder", dtype)}
        besides = sum(module_bytes(m) for m in modules.values())
        modules["unet"] = folder_component(path / "transformer", ZImageTransformer2DModel, dtype, offload, besides,
                                           as_stored=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: not a loadable diffusers Z-Image folder ({exc})") from exc
    for m in modules.values():
        m.eval()
        m.requires_grad_(False)
    time_embedder_in_compute_dtype(modules["unet"])
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer", local_files_only=True)
    else:
        tokenizer = qwen_tokenizer("3")
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
