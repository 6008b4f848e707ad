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

from pathlib import Path
from typing import Any

from nodes.checkpoint import ovis_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import Loaded

LABEL = "Ovis-Image"


def has_transformer(keys_: Any) -> bool:
    """An Ovis-Image transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


#: The transformer file's whole build, loader and build straight into disk blocks
#: (nodes.checkpoint.flow_transformers.TransformerFiles): either layout; ComfyUI's gated MLPs stack the up and
#: gate projections' rows into one module tensor (``stacks``).
FILES = TransformerFiles("OvisImageTransformer2DModel", keys, "ovis", LABEL, stacks=True)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Ovis-Image's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Ovis-Image folder (``OvisImagePipeline.save_pretrained``: transformer, Qwen3 text encoder,
    FLUX's VAE, tokenizer, scheduler) through nodes.checkpoint.flow_transformers.load_pipeline_folder;
    Qwen3 read as Z-Image's folder Qwen3 is (nodes.checkpoint.z_image_load), the folder's tokenizer or
    Kiln's Qwen3 one."""
    from diffusers import AutoencoderKL, OvisImageTransformer2DModel
    from transformers import AutoTokenizer

    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.tokenizer_memo import folder_tokenizer
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.checkpoint.z_image_load import folder_qwen3
    from nodes.families import ovis as fam

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_qwen3(path / "text_encoder", dtype)}

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, OvisImageTransformer2DModel, others,
                                lambda: folder_tokenizer(path, AutoTokenizer, lambda: qwen_tokenizer("3")))
