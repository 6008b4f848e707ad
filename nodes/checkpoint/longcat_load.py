"""Loading LongCat-Image offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/longcat_image*.safetensors``,
  ``longcat_image_edit*``: bf16, fp8_scaled, int8_convrot) in the original FLUX-style key layout (with or
  without ``model.diffusion_model.``) or in diffusers' layout in one file; the key map is
  nodes.checkpoint.longcat_keys, the build FLUX's rule (nodes.checkpoint.flux_load.transformer_from_file:
  config from shapes, fp8/int8 scales following the renames through nodes.checkpoint.scaled_fp8), or built
  straight into disk blocks when the model manager pages it there (:func:`file_layout`).
* Qwen2.5-VL 7B through CLIPLoader type ``longcat_image`` (``qwen_2.5_vl_7b*.safetensors``): the same
  encoder Qwen-Image loads (nodes.checkpoint.qwen_image_load.build_text_model, through
  nodes.checkpoint.split: the family's encoder kind is ``qwen2.5-vl``).
* The VAE is FLUX.1's (``ae.safetensors``, VAELoader).
* A diffusers folder (``LongCatImagePipeline.save_pretrained``) through CheckpointLoaderSimple.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nodes.checkpoint import longcat_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import Loaded

LABEL = "LongCat-Image"


def has_transformer(keys_: Any) -> bool:
    """A LongCat-Image transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): either
#: layout, FLUX's fused q/k/v split by rows in a build straight into disk blocks.
FILES = TransformerFiles("LongCatImageTransformer2DModel", keys, "longcat", LABEL)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- diffusers folders ----------------------------------------------------------------------------


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is LongCat-Image's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers LongCat-Image folder (``LongCatImagePipeline`` / ``LongCatImageEditPipeline.save_pretrained``:
    transformer, FLUX's VAE, Qwen2.5-VL (its vision tower, when saved, built on the first picture read), tokenizer,
    scheduler) through nodes.checkpoint.flow_transformers.load_pipeline_folder; the latent's scale and shift
    from the VAE's config. The text processor is not read (Kiln reads pictures with its own, the release's bounds)."""
    from diffusers import AutoencoderKL, LongCatImageTransformer2DModel

    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.qwen_image_load import folder_text_encoder, qwen25_folder_tokenizer
    from nodes.families import longcat as fam

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_text_encoder(path, dtype)}

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, LongCatImageTransformer2DModel, others,
                                lambda: qwen25_folder_tokenizer(path))
