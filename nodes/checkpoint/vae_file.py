"""A standalone VAE file or folder (VAELoader), offline: which VAE a file holds, and the module built from it.

The families' VAEs are told apart by their keys, most specific first: Qwen-Image 2.1's RGBA VAE,
Qwen-Image's (the Wan 2.1 VAE, also ChronoEdit's), diffusers' AutoencoderKL layout in one file, FLUX.2's
(32 channels and the latent batch-norm), FLUX's ae (16 channels), and the LDM layout of the SD families
(configured from the shapes and the family's defaults). Folders: FLUX.2's AutoencoderKLFlux2 behind its
patch latent, or an AutoencoderKL. Split out of nodes.checkpoint.load, which builds whole checkpoints.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes import families
from nodes.checkpoint import detect as det
from nodes.checkpoint.load import CheckpointError, _assign, _empty, open_state, reading
from nodes.checkpoint.tensors import LazyState, cast_view, plain, shapes_of
from nodes.families.base import Family


def load_vae_file(path: Path, dtype: Any, family: Family | None = None) -> Any:
    """A standalone VAE (keys with or without ``first_stage_model.``, or a diffusers AutoencoderKL)."""
    from diffusers import AutoencoderKL

    from nodes.checkpoint.folders import folder_component

    if path.is_dir() and (path / "config.json").is_file() and \
            '"AutoencoderKLFlux2"' in (path / "config.json").read_text():  # FLUX.2's, behind its patch latent
        from diffusers import AutoencoderKLFlux2

        from nodes.checkpoint.flux2_vae import Flux2LatentVAE

        return Flux2LatentVAE(folder_component(path, AutoencoderKLFlux2, dtype)).eval().requires_grad_(False)
    if path.is_dir():
        try:
            vae = folder_component(path, AutoencoderKL, dtype)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: not a diffusers VAE folder ({exc})") from exc
        return vae.eval().requires_grad_(False)
    family = family or families.by_name("sd1")
    state = open_state(path)
    with reading(path):
        return _build_vae(path, state, dtype, family)


def _build_vae(path: Path, state: Mapping[str, Any], dtype: Any, family: Family) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    from nodes.checkpoint import (hunyuan_image_load, hunyuan_refiner_vae, hunyuan_video15_load, qwen_image21_load,
                                  qwen_image_vae)

    if hunyuan_video15_load.is_vae(shapes_of(state)):  # HunyuanVideo 1.5's (Capybara's) 32-channel video VAE
        return hunyuan_video15_load.build_vae(plain(state), path.name, dtype)
    if hunyuan_refiner_vae.is_refiner_vae(shapes_of(state)):  # HunyuanImage 2.1 refiner's 32-channel video VAE
        return hunyuan_refiner_vae.build_vae(plain(state), path.name, dtype)
    if hunyuan_image_load.is_vae(shapes_of(state)):  # HunyuanImage 2.1's 64-channel 32x VAE, either layout
        return hunyuan_image_load.build_vae(plain(state), path.name, dtype)
    if qwen_image21_load.is_vae(shapes_of(state)):  # Qwen-Image 2.1's 64-channel RGBA VAE, either layout
        return qwen_image21_load.build_vae(plain(state), path.name, dtype)
    if qwen_image_vae.is_qwen_vae(state.keys()):  # Qwen-Image's (the Wan 2.1 VAE), either layout
        return qwen_image_vae.build(plain(state), path.name, dtype)
    if any(k.startswith("encoder.down_blocks.") for k in state):  # diffusers layout in one file
        cfg = _diffusers_vae_config(shapes_of(state), family)
        vae = _empty(AutoencoderKL, cfg)
        return _assign(vae, cast_view(state, dtype), "VAE", dtype)
    if not any(k.startswith(det.VAE) for k in state):
        state = state.renamed({det.VAE + k: k for k in state}) if isinstance(state, LazyState) \
            else {det.VAE + k: v for k, v in state.items()}
    shapes = shapes_of(state)
    from nodes.checkpoint import flux2_load, flux_load

    if flux2_load.is_flux2_vae(shapes, det.VAE):  # FLUX.2's flux2-vae.safetensors: 32 channels and bn.*
        return flux2_load.build_vae(plain(state), det.VAE, path.name, dtype)
    if flux_load.is_flux_vae(shapes, det.VAE):  # FLUX's ae.safetensors: 16 channels, scale and shift
        return flux_load.build_vae(plain(state), det.VAE, path.name, dtype)
    try:
        cfg = det.vae_config(shapes, family)
    except (det.UnsupportedCheckpoint, KeyError) as exc:
        raise CheckpointError(f"{path.name}: no VAE weights found ({exc})") from exc
    vae = _empty(AutoencoderKL, cfg)
    return _assign(vae, sfu.convert_ldm_vae_checkpoint(cast_view(state, dtype), dict(vae.config)), "VAE", dtype)


def _diffusers_vae_config(shapes: dict[str, tuple], family: Family) -> dict[str, Any]:
    import re

    levels = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
    layers = len({int(m.group(1)) for k in shapes for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    return dict(family.vae_defaults(), layers_per_block=layers,
                in_channels=shapes["encoder.conv_in.weight"][1],
                out_channels=shapes["decoder.conv_out.weight"][0],
                latent_channels=shapes["decoder.conv_in.weight"][1],
                block_out_channels=tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in levels),
                down_block_types=("DownEncoderBlock2D",) * len(levels),
                up_block_types=("UpDecoderBlock2D",) * len(levels))
