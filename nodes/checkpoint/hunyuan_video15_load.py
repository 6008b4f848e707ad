"""Loading HunyuanVideo 1.5 (and Capybara, a checkpoint of it) offline: ComfyUI's split files and diffusers
folders.

* The transformer alone (UNETLoader: ``hunyuanvideo1.5_*.safetensors``, ``capybara_v0.1.safetensors``) in
  Tencent's original layout (nodes.checkpoint.hunyuan_video15_keys), bare or under
  ``model.diffusion_model.``, or diffusers' names in one file; FLUX's rule builds it
  (nodes.checkpoint.flux_load.transformer_from_file: config from the shapes, fp8 scales followed).
* The VAE (VAELoader, ``hunyuanvideo15_vae_fp16.safetensors``): diffusers' ``AutoencoderKLHunyuanVideo15``
  (32 channels, 16x, causal in time) from Tencent's names, coding a picture as one frame (:class:`PictureVAE`).
  ComfyUI tells this VAE by its causal convolutions' inner ``.conv`` (``decoder.conv_in.conv.weight``, 32
  channels: comfy/sd.py); the HunyuanImage 2.1 refiner's released VAE has plain ``decoder.conv_in.weight``.
  Kiln's refiner VAE (nodes.checkpoint.hunyuan_refiner_vae, diffusers' AutoencoderKLHunyuanImageRefiner) reads
  the same tensors under diffusers' names, so a file in Tencent's names with the inner ``.conv`` is this
  VAE and one in diffusers' names the refiner's (the two compute alike on one frame; their latents differ:
  this one's 32 channels, the refiner's stacked 64).
* Qwen2.5-VL 7B and ByT5 through DualCLIPLoader type ``hunyuan_video_15``: the same files and builders as
  HunyuanImage 2.1's (nodes.checkpoint.hunyuan_image_load).
* A diffusers folder (``HunyuanVideo15Pipeline.save_pretrained``: transformer/, vae/, text_encoder/ Qwen2.5-VL,
  tokenizer/, text_encoder_2/ ByT5, tokenizer_2/, scheduler/, guider/; the image-to-video pipeline's too)
  through CheckpointLoaderSimple / DiffusersLoader (nodes.checkpoint.pipeline_folders): the same builders as the
  split files, so both give the same modules (:func:`load_folder`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import hunyuan_video15_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.wrapped_vae import OneFrameVAE

LABEL = keys.LABEL
#: Pixels per latent cell.
DOWNSCALE = 16


def has_transformer(keys_: Any) -> bool:
    """A HunyuanVideo 1.5 transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


FILES = TransformerFiles("HunyuanVideo15Transformer3DModel", keys, "hunyuan_video15", LABEL)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- the VAE ----------------------------------------------------------------------------------------


def is_vae(shapes: Mapping[str, tuple]) -> bool:
    """HunyuanVideo 1.5's VAE as ComfyUI's file holds it: Tencent's names (``decoder.mid.attn_1``), a
    32-channel latent into a causal 3-D decoder whose convolutions are named ``*.conv.weight``."""
    conv = shapes.get("decoder.conv_in.conv.weight")
    return conv is not None and len(conv) == 5 and conv[1] == 32 and "decoder.mid.attn_1.proj_out.weight" in shapes


class PictureVAE(OneFrameVAE):
    """The video VAE coding a picture [B, 3, H, W] as one frame: [B, 32, h, w] latents."""

    kiln_downscale = DOWNSCALE

    def __init__(self, vae: Any) -> None:
        super().__init__(vae, shift_factor=None)


def build_vae(state: Mapping[str, Any], what: str, dtype: Any) -> PictureVAE:
    """The VAE from Tencent's names (the refiner VAE's renames and config rule: the two share the layout); a
    key that does not fit names the file."""
    from diffusers import AutoencoderKLHunyuanVideo15

    from nodes.checkpoint.hunyuan_refiner_vae import build_layout

    return build_layout(state, what, dtype, AutoencoderKLHunyuanVideo15, PictureVAE, f"{LABEL} VAE")


# -- diffusers folders ------------------------------------------------------------------------------


def is_folder(path: Path) -> bool:
    """A diffusers HunyuanVideo 1.5 folder (text or image to video): its transformer config names diffusers'
    HunyuanVideo15Transformer3DModel."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Any:
    """A diffusers HunyuanVideo 1.5 folder through nodes.checkpoint.flow_transformers.load_pipeline_folder with
    the split files' builders: the VAE by :func:`build_vae` (diffusers' names pass its renames), Qwen2.5-VL,
    ByT5 and their tokenizers by HunyuanImage 2.1's folder rules (nodes.checkpoint.hunyuan_image_load, the same
    encoders). The latent is the family's; the shift the folder's scheduler config over the family's. An
    image-to-video folder's image_encoder/ (SigLIP) is not read: edits take it through CLIPVisionLoader, as
    from the split files."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from nodes.checkpoint import hunyuan_image_load as image
    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.qwen_image_load import qwen25_folder_tokenizer
    from nodes.families import hunyuan_video15

    loaded = load_pipeline_folder(path, dtype, offload, hunyuan_video15.FAMILY, LABEL,
                                  HunyuanVideo15Transformer3DModel,
                                  lambda: image.folder_encoders(path, dtype, build_vae),
                                  lambda: qwen25_folder_tokenizer(path), latent_from_vae=False)
    return image.folder_tokenizers(path, loaded)
