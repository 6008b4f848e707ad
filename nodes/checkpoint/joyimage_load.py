"""Loading JoyImage Edit offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/joyai_image_edit_*.safetensors``: bf16,
  fp8_scaled, int8_convrot), with or without ``model.diffusion_model.``; diffusers' names are the same
  (nodes.checkpoint.joyimage_keys). The build is FLUX's rule (nodes.checkpoint.flux_load
  .transformer_from_file: config from the shapes, fp8/int8 scales through nodes.checkpoint.scaled_fp8),
  or straight into disk blocks when the model manager pages it there (:func:`file_layout`).
* Qwen3-VL 8B through CLIPLoader type ``joyimage`` (``qwen3vl_8b_joyimage_edit*.safetensors``): Krea 2's
  builder (nodes.checkpoint.krea2_load.build_encoder), the vision tower built on the first picture read.
* The VAE is Wan 2.1's (``wan_2.1_vae.safetensors``), which Kiln's Qwen-Image VAE loader reads
  (nodes.checkpoint.qwen_image_vae: the same architecture and latent statistics).
* A diffusers folder (``JoyImageEditPipeline.save_pretrained``: transformer/, vae/ (AutoencoderKLWan),
  text_encoder/ (Qwen3-VL), tokenizer/, processor/, scheduler/) through CheckpointLoaderSimple or
  DiffusersLoader (:func:`load_folder`).

The class keeps its time embedder in float32 (``_keep_in_fp32_modules``); every path here holds it so,
read from the file whatever the compute dtype (nodes.checkpoint.kept_fp32), as diffusers' loads do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nodes.checkpoint import joyimage_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint import kept_fp32
from nodes.checkpoint.load import Loaded

LABEL = "JoyImage"


def has_transformer(keys_: Any) -> bool:
    """A JoyImage transformer, with or without ComfyUI's prefix."""
    return keys.is_original(keys_)


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is JoyImage's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers JoyImage folder, as Krea 2's (nodes.checkpoint.krea2_load.qwen3_vl_folder): the Wan 2.1
    VAE through Kiln's Qwen-Image VAE, Qwen3-VL with its vision tower on demand, the folder's tokenizer
    and scheduler; the time embedder in float32 from ``transformer/``'s files."""
    from diffusers import JoyImageEditTransformer3DModel

    from nodes.checkpoint.kept_fp32 import keep_in_fp32
    from nodes.checkpoint.krea2_load import qwen3_vl_folder
    from nodes.families import joyimage as fam

    return qwen3_vl_folder(path, dtype, offload, fam.FAMILY, LABEL, JoyImageEditTransformer3DModel, keep_in_fp32)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): its names
#: are the module's own (each tensor its own row in a build straight into disk blocks); the modules the class
#: keeps in float32 held so from the file last in both builds (nodes.checkpoint.kept_fp32, whose size asked
#: counts them so).
FILES = TransformerFiles("JoyImageEditTransformer3DModel", keys, "joyimage", LABEL, own_names=True,
                         after=lambda model, state: kept_fp32.keep_in_fp32(model, state))
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout
