"""Loading Ovis-Image offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/ovis_image_bf16.safetensors``; fp8 and
  ComfyUI's scaled fp8 / int8 files through nodes.checkpoint.scaled_fp8) in ComfyUI's FLUX-style layout
  (with or without ``model.diffusion_model.``) or diffusers' layout in one file; the key map is
  nodes.checkpoint.ovis_keys, the build FLUX's rule (nodes.checkpoint.flux_load.transformer_from_file:
  config from shapes, scales following the renames), or straight into disk blocks when the model manager
  pages it there (:func:`file_layout`: its gated MLPs stack two file tensors into one module tensor).
* Ovis 2.5's language model, a Qwen3 decoder (``ovis_2.5.safetensors``), through CLIPLoader type
  ``ovis`` (nodes.checkpoint.split: a Qwen3 file, built by nodes.checkpoint.qwen3_text), with Kiln's
  Qwen tokenizer.
* ``ae.safetensors``, FLUX.1's VAE, through VAELoader.
* A diffusers folder (``OvisImagePipeline.save_pretrained``) through CheckpointLoaderSimple.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import ovis_keys as keys
from nodes.checkpoint.load import Loaded

LABEL = "Ovis-Image"


def has_transformer(keys_: Any) -> bool:
    """An Ovis-Image transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """OvisImageTransformer2DModel from ComfyUI- or diffusers-layout tensors (linear weights held as stored)."""
    from diffusers import OvisImageTransformer2DModel

    from nodes.checkpoint.flux_load import transformer_from_file

    return transformer_from_file(state, what, dtype, OvisImageTransformer2DModel, LABEL, keys,
                                 keys.original_to_diffusers, keys.diffusers_to_original, keys.is_diffusers)


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's Ovis-Image path (nodes.checkpoint.flow_transformers); a transformer the manager pages to
    disk is built straight into its blocks (:func:`file_layout`)."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import ovis as fam

    return transformer_file(state, name, dtype, fp8, build_transformer, fam.FAMILY, LABEL, offload, file_layout)


def file_layout(state: Mapping[str, Any], what: str) -> Any:
    """How an Ovis-Image file (prefix stripped) becomes its module, for a build straight into disk blocks
    (nodes.checkpoint.paged_files): ComfyUI's layout through nodes.checkpoint.ovis_keys' table, whose MLP
    input stacks the up and gate projections' rows (``stacks``), diffusers' as it is. No module is kept
    in float32, so there is no last touch."""
    from diffusers import OvisImageTransformer2DModel

    from nodes.checkpoint.paged_files import keyed_layout

    return keyed_layout(OvisImageTransformer2DModel, LABEL, keys, keys.is_diffusers(state), stacks=True)


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Ovis-Image's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, "OvisImageTransformer2DModel")


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Ovis-Image folder (``OvisImagePipeline.save_pretrained``: transformer, Qwen3 text encoder,
    FLUX's VAE, tokenizer, scheduler) through nodes.checkpoint.flow_transformers.load_pipeline_folder;
    Qwen3 read as Z-Image's folder Qwen3 is (nodes.checkpoint.z_image_load), the folder's tokenizer or
    Kiln's Qwen3 one."""
    from diffusers import AutoencoderKL, OvisImageTransformer2DModel
    from transformers import AutoTokenizer

    from nodes.checkpoint.flow_transformers import folder_tokenizer, load_pipeline_folder
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.checkpoint.z_image_load import folder_qwen3
    from nodes.families import ovis as fam

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_qwen3(path / "text_encoder", dtype)}

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, OvisImageTransformer2DModel, others,
                                lambda: folder_tokenizer(path, AutoTokenizer, lambda: qwen_tokenizer("3")))
