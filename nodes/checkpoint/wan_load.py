"""Loading Wan 2.1 image-to-video / ChronoEdit offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/chrono_edit_14B_fp16.safetensors``; fp8 and
  fp8_scaled files alike) in Wan's key layout (with or without ``model.diffusion_model.``) or diffusers'
  in one file; the key map is nodes.checkpoint.wan_keys, the build FLUX's rule through
  nodes.checkpoint.flow_transformers.TransformerFiles, as diffusers' ChronoEditTransformer3DModel with
  ComfyUI's rotary positions (nodes.checkpoint.wan_rope) in place of its own table. The modules the class
  keeps in float32 are held so, read from the file (nodes.checkpoint.kept_fp32).
* UMT5-XXL through CLIPLoader type ``wan`` (nodes.checkpoint.umt5_text).
* CLIP ViT-H through CLIPVisionLoader (``clip_vision_h.safetensors``: nodes.vision_models).
* The VAE is Wan 2.1's (``wan_2.1_vae.safetensors``): Kiln's Qwen-Image VAE loader reads it
  (nodes.checkpoint.qwen_image_vae), whose frames path encodes and decodes the video.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import kept_fp32, wan_rope
from nodes.checkpoint import wan_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import CheckpointError

LABEL = "Wan 2.1"


def has_transformer(keys_: Any) -> bool:
    """A Wan 2.1 transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


def _refuse(state: Any, what: str) -> None:
    """Kiln runs Wan 2.1's image-to-video transformer (ChronoEdit's), which reads CLIP vision features."""
    if keys.is_original(state) and not keys.has_keys(state, keys.I2V_MARKER):
        raise CheckpointError(f"{what} holds a Wan 2.1 text-to-video transformer (no img_emb.*); Kiln runs the "
                              "image-to-video one ChronoEdit is (chrono_edit_14B*.safetensors)")


def _finish(model: Any, state: Any) -> Any:
    """The float32 modules from the file, then ComfyUI's rotary positions."""
    kept = kept_fp32.keep_in_fp32(model, state, lambda name: (name, keys.to_original_name(name)))
    return wan_rope.install(kept)


FILES = TransformerFiles("ChronoEditTransformer3DModel", keys, "wan", LABEL, refuse=_refuse, after=_finish)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout
