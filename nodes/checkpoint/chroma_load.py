"""Loading Chroma offline: ComfyUI's split files and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/chroma*.safetensors``) in the
  original key layout (with or without ``model.diffusion_model.``) or diffusers'; the key map
  is nodes.checkpoint.chroma_keys. The T5-XXL file comes through CLIPLoader (type ``chroma``,
  nodes.checkpoint.split) and ``ae.safetensors`` through VAELoader, both as for FLUX.
* diffusers folders (``ChromaPipeline.save_pretrained``: ``transformer/``, ``text_encoder/`` (T5),
  ``tokenizer/``, ``vae/``, ``scheduler/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nodes.checkpoint import chroma_keys
from nodes.checkpoint.load import CheckpointError, Loaded
from nodes.checkpoint.flow_transformers import TransformerFiles, is_pipeline_folder, load_pipeline_folder
from nodes.checkpoint.tokenizer_memo import folder_tokenizer
from nodes.families import chroma as fam

#: diffusers' layout of the approximator (the original names its layers in_layer / out_layer).
DIFFUSERS_MARKER = "distilled_guidance_layer.layers.0.linear_1.weight"
#: Chroma1-Radiance's pixel-space head (ComfyUI's chroma_radiance): UNETLoader reads those files as Radiance
#: (nodes.checkpoint.chroma_radiance_load) before they reach Chroma's loader.
RADIANCE = "nerf_"


def has_chroma_transformer(shapes: Any) -> bool:
    return fam.FAMILY.claims_unet(shapes)


def _latent_only(state: Any, what: str) -> None:
    """Chroma1-Radiance refused by name (both builds) where it reaches Chroma's loader (not through UNETLoader)."""
    if any(k.startswith(RADIANCE) for k in state):
        raise CheckpointError(f"{what} is Chroma1-Radiance (pixel-space Chroma: {RADIANCE}* keys, no VAE "
                              "latents); load it alone with UNETLoader (models/diffusion_models)")


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): either
#: layout (nodes.checkpoint.chroma_keys' table), Chroma1-Radiance refused by name in both builds.
FILES = TransformerFiles("ChromaTransformer2DModel", chroma_keys, "chroma", "Chroma",
                         is_diffusers=lambda s: DIFFUSERS_MARKER in s, refuse=_latent_only)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


def is_chroma_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Chroma's (its config names the class)."""
    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Chroma pipeline folder (nodes.checkpoint.flow_transformers.load_pipeline_folder);
    T5 and the transformer held as stored, as FLUX's folders."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import T5TokenizerFast

    from nodes.checkpoint.flux_load import _folder_t5
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": _folder_t5(path / "text_encoder", dtype)}

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, "Chroma", ChromaTransformer2DModel, others,
                                lambda: folder_tokenizer(path, T5TokenizerFast, t5_tokenizer))
