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
from nodes.checkpoint.load import CheckpointError, Loaded

LABEL = "Kandinsky 5"


def has_transformer(keys_: Any) -> bool:
    """A Kandinsky 5 transformer, with or without ComfyUI's prefix."""
    return keys.is_original(keys_)


def _refuse(state: Mapping[str, Any], what: str) -> None:
    """A variant Kiln does not run (video, image editing) is a CheckpointError that says so."""
    try:
        keys.transformer_config({k: tuple(v.shape) for k, v in state.items()})
    except keys.UnsupportedVariant as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    except keys.KeyMismatch:
        pass  # an incomplete file: transformer_from_original names what is missing


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """Kandinsky5Transformer3DModel from a file's tensors (linear weights held as stored, the float32
    modules read again from the file in float32)."""
    from diffusers import Kandinsky5Transformer3DModel

    from nodes.checkpoint.flux_load import transformer_from_file
    from nodes.checkpoint.kept_fp32 import keep_in_fp32

    model = transformer_from_file(state, what, dtype, Kandinsky5Transformer3DModel, LABEL, keys,
                                  keys.original_to_diffusers, keys.diffusers_to_original, keys.is_diffusers,
                                  refuse=lambda s: _refuse(s, what))
    return keep_in_fp32(model, state)


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's Kandinsky 5 path (nodes.checkpoint.flow_transformers); ``offload`` as FLUX's."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import kandinsky5 as fam

    return transformer_file(state, name, dtype, fp8, build_transformer, fam.FAMILY, LABEL, offload, file_layout)


def file_layout(state: Mapping[str, Any], what: str) -> Any:
    """How a Kandinsky 5 file (prefix stripped) becomes its module, for a build straight into disk blocks."""
    from diffusers import Kandinsky5Transformer3DModel

    from nodes.checkpoint.kept_fp32 import keep_in_fp32
    from nodes.checkpoint.paged_files import keyed_layout

    return keyed_layout(Kandinsky5Transformer3DModel, LABEL, keys, False,
                        after=lambda model: keep_in_fp32(model, state))
