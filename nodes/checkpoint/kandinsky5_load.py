"""Loading Kandinsky 5.0 (text to image, Lite) offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/kandinsky5lite_t2i.safetensors``: bf16,
  fp8_scaled, int8_convrot) in its one key layout (Kandinsky Lab's = ComfyUI's = diffusers':
  nodes.checkpoint.kandinsky5_keys), bare or under ``model.diffusion_model.``; the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from shapes, fp8/int8 scales through
  nodes.checkpoint.scaled_fp8). The modules diffusers keeps in float32 (time embedding, modulations) are
  read again in float32 (nodes.checkpoint.kept_fp32).
* Qwen2.5-VL 7B and CLIP-L through DualCLIPLoader type ``kandinsky5_image`` (Qwen-Image's
  ``qwen_2.5_vl_7b*.safetensors`` builder and Kiln's CLIP-L; nodes.checkpoint.split.load_text_files).
* The VAE is FLUX's (``ae.safetensors``, VAELoader).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint import kandinsky5_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint import kept_fp32
from nodes.checkpoint.load import CheckpointError, Loaded
from nodes.checkpoint.tokenizer_memo import folder_tokenizer

LABEL = "Kandinsky 5"


def has_transformer(keys_: Any) -> bool:
    """A Kandinsky 5 transformer, with or without ComfyUI's prefix."""
    return keys.is_original(keys_)


def _refuse(state: Mapping[str, Any], what: str) -> None:
    """A variant Kiln does not run (video, image editing) is a CheckpointError that says so (the shapes
    only: a lazily read file stays unread)."""
    from nodes.checkpoint.tensors import shapes_of

    try:
        keys.transformer_config(shapes_of(state))
    except keys.UnsupportedVariant as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    except keys.KeyMismatch:
        pass  # an incomplete file: transformer_from_original names what is missing


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): one layout
#: (diffusers' names are the original ones), a variant Kiln does not run refused by name and the modules
#: diffusers keeps in float32 read again from the file in float32 (nodes.checkpoint.kept_fp32) in both builds.
FILES = TransformerFiles("Kandinsky5Transformer3DModel", keys, "kandinsky5", LABEL, refuse=_refuse,
                         after=lambda model, state: kept_fp32.keep_in_fp32(model, state))
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- diffusers folders ----------------------------------------------------------------------------


def is_folder(path: Any) -> bool:
    """A diffusers folder whose transformer is Kandinsky 5's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Any, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Kandinsky 5 folder (``Kandinsky5T2IPipeline.save_pretrained``: transformer, Qwen2.5-VL
    (Qwen-Image's folder rule: nodes.checkpoint.qwen_image_load.folder_text_encoder), CLIP-L, FLUX's VAE, their
    tokenizers (else Kiln's), the scheduler config) through
    nodes.checkpoint.flow_transformers.load_pipeline_folder; the latent is FLUX's format, as from the split
    files, and the modules diffusers keeps in float32 are read again in float32 from ``transformer/``."""
    import dataclasses

    from diffusers import AutoencoderKL, Kandinsky5Transformer3DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.folders import folder_component, folder_state
    from nodes.checkpoint.kept_fp32 import keep_in_fp32
    from nodes.checkpoint.qwen_image_load import folder_text_encoder, qwen25_folder_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer
    from nodes.families import kandinsky5 as fam

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_text_encoder(path, dtype),
                "text_encoder_2": folder_component(path / "text_encoder_2", CLIPTextModel, dtype)}

    found = folder_state(path / "transformer", dtype)
    files = {} if found is None else found[1]
    loaded = load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, Kandinsky5Transformer3DModel, others,
                                  lambda: qwen25_folder_tokenizer(path),
                                  latent_from_vae=False, ready=lambda model: keep_in_fp32(model, files),
                                  ready_in_blocks=True)
    second = folder_tokenizer(path, CLIPTokenizer, clip_tokenizer, "tokenizer_2")
    return dataclasses.replace(loaded, tokenizers={**loaded.tokenizers, "tokenizer_2": second})
