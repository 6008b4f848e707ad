"""Loading Qwen-Image 2.1 offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/qwen_image_2.1_*.safetensors``: bf16,
  fp8, int8_convrot) in ComfyUI's layout (fused ``gate_up``, with or without ``model.diffusion_model.``)
  or in diffusers' names; the key map is nodes.checkpoint.qwen_image21_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from shapes, fp8/int8 row scales split
  with the fused weight through nodes.checkpoint.scaled_fp8).
* Qwen3-VL 8B through CLIPLoader type ``qwen_image`` (``qwen3vl_8b_*.safetensors``): read by Krea 2's
  Qwen3-VL builder (nodes.checkpoint.krea2_load.build_text_model; the vision tower is not read). Its
  keys tell it from Qwen-Image 1's Qwen2.5-VL (q_norm / k_norm, nodes.checkpoint.split.TextFile).
* A diffusers folder (``QwenImage21Pipeline.save_pretrained``: transformer, Qwen3-VL, the VAE, the
  processor's tokenizer, the scheduler) through CheckpointLoaderSimple; its scheduler config sets the
  shift (the pipeline's size rule), as other families' folders do.
* The 64-channel RGBA VAE (VAELoader, ``qwen_image_2.1_vae_bf16.safetensors``): diffusers'
  AutoencoderKLQwenImage21 behind Kiln's image-VAE surface (:class:`RgbaFrameVAE`). ComfyUI's file is
  in Wan 2.2's layout with one-frame kernels (ComfyUI tells it from Wan 2.2's VAE so, as Kiln does).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import qwen_image21_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import CheckpointError, Loaded
from nodes.checkpoint.qwen_image_vae import FrameVAE
from nodes.checkpoint.tokenizer_memo import from_folder

LABEL = "Qwen-Image 2.1"
#: The VAE's pixels per latent cell.
DOWNSCALE = 16


def has_transformer(keys_: Any) -> bool:
    return keys.is_transformer(keys_)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): both
#: layouts share names (qwen_image21_keys.original_to_diffusers reads either), so one conversion serves.
FILES = TransformerFiles("QwenImage21Transformer2DModel", keys, "qwen_image21", LABEL)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- the VAE ----------------------------------------------------------------------------------------


class RgbaFrameVAE(FrameVAE):
    """The 2.1 VAE on single images. It codes RGBA: a decode gives an RGBA IMAGE (ComfyUI's VAEDecode does
    too: the templates save transparent PNGs), and a picture without alpha is encoded opaque (alpha 1,
    ComfyUI's ``pad_channel_value``; +1 in the VAE's [-1, 1] range)."""

    kiln_downscale = DOWNSCALE


def is_vae(shapes: Any) -> bool:
    """The 2.1 VAE in either layout (``shapes``: key -> shape); Wan 2.2's VAE, the same layout with
    three-frame kernels, is not it."""
    return keys.is_vae(shapes)


def build_vae(state: Mapping[str, Any], what: str, dtype: Any) -> RgbaFrameVAE:
    """The VAE from either layout's tensors; a file that does not fit names the family and the keys."""
    from diffusers import AutoencoderKLQwenImage21

    from nodes.checkpoint.load import _assign, _empty

    try:
        state = keys.vae_to_diffusers(dict(state), what)
        config = keys.vae_config({k: tuple(v.shape) for k, v in state.items()})
    except keys.KeyMismatch as exc:
        raise CheckpointError(f"{what}: not a complete {LABEL} VAE ({exc})") from None
    vae = _empty(AutoencoderKLQwenImage21, config)
    try:
        vae = _assign(vae, state, f"{LABEL} VAE", dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    return RgbaFrameVAE(vae).eval().requires_grad_(False)


# -- diffusers folders ----------------------------------------------------------------------------


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Qwen-Image 2.1's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Qwen-Image 2.1 folder through nodes.checkpoint.flow_transformers.load_pipeline_folder;
    the tokenizer from ``processor/`` (the pipeline saves its Qwen3VLProcessor there), else Kiln's own."""
    from diffusers import QwenImage21Transformer2DModel
    from transformers import Qwen2TokenizerFast

    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.tokenizer_memo import folder_tokenizer
    from nodes.checkpoint.krea2_load import build_text_model
    from nodes.checkpoint.qwen_image_load import vae_and_text_encoder
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.families import qwen_image21 as fam

    def tokenizer() -> Any:
        if (path / "processor" / "tokenizer.json").is_file():
            return from_folder(Qwen2TokenizerFast, path, "processor")
        return folder_tokenizer(path, Qwen2TokenizerFast, lambda: qwen_tokenizer("3"))

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, QwenImage21Transformer2DModel,
                                lambda: vae_and_text_encoder(path, dtype, build_text_model, build_vae),
                                tokenizer, latent_from_vae=False)
