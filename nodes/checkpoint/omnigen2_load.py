"""Loading OmniGen2 offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``omnigen2_fp16.safetensors``) with ComfyUI's keys (with or without
  ``model.diffusion_model.``), which are the parameter names of Kiln's own module
  (nodes.checkpoint.omnigen2_net): no renaming. The config comes from the shapes; a key missing or left
  over is a CheckpointError naming the file and the keys.
* Qwen2.5-VL 3B through CLIPLoader type ``omnigen2`` (``qwen_2.5_vl_fp16.safetensors``): the kind
  ``qwen2.5-vl`` Qwen-Image's loader builds from the file's shapes (nodes.checkpoint.qwen_image_load).
* FLUX.1's VAE (``ae.safetensors``) through VAELoader.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.flux_keys import has_keys, strip
from nodes.checkpoint.load import CheckpointError, Loaded

LABEL = "OmniGen2"
#: Keys no other family's transformer has (Lumina 2's diffusers names share the rest).
MARKERS = ("ref_image_patch_embedder.weight", "image_index_embedding")
#: ComfyUI's rotary split of the release's 120-wide heads.
AXES_120 = (40, 40, 40)


def has_transformer(keys: Any) -> bool:
    """An OmniGen2 transformer, with or without ComfyUI's prefix."""
    return has_keys(keys, *MARKERS)


def _count(shapes: Mapping[str, tuple], group: str) -> int:
    found = {int(k.split(".")[1]) for k in shapes if k.startswith(group + ".") and k.split(".")[1].isdigit()}
    return max(found) + 1 if found else 0


def rope_axes(head: int) -> tuple[int, int, int]:
    """(40, 40, 40) for the release's 120-wide head (ComfyUI's constant); other widths, three equal even
    parts (the weights do not say it); a ValueError where the head cannot be split so."""
    if head == sum(AXES_120):
        return AXES_120
    if head % 6:
        raise ValueError(f"an OmniGen2 head of width {head} cannot be split into three even rotary axes")
    return (head // 3,) * 3


def transformer_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """OmniGen2Transformer arguments from (prefix-free) shapes; KeyError names a missing key."""
    dim, patch_in = shapes["x_embedder.weight"]
    head = shapes["layers.0.attn.norm_q.weight"][0]
    return dict(hidden_size=dim, num_attention_heads=dim // head,
                num_kv_heads=shapes["layers.0.attn.to_k.weight"][0] // head, num_layers=_count(shapes, "layers"),
                num_refiner_layers=_count(shapes, "noise_refiner"), in_channels=patch_in // 4,
                ffn_inner=shapes["layers.0.feed_forward.linear_1.weight"][0],
                text_feat_dim=shapes["time_caption_embed.caption_embedder.0.weight"][0], axes_dim_rope=rope_axes(head))


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """The module from a file's tensors (ComfyUI's names, prefix taken off), linear weights held as stored
    (an fp8 file's stay fp8), the rest in ``dtype``. A key that does not fit names the file and the key."""
    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.load import _empty
    from nodes.checkpoint.omnigen2_net import OmniGen2Transformer
    from nodes.checkpoint.tensors import shapes_of

    state, scales = scaled_fp8.take(strip(dict(state)), what)
    try:
        config = transformer_config(shapes_of(state))
    except KeyError as exc:
        raise CheckpointError(f"{what}: not a complete {LABEL} transformer ({exc} is missing)") from None
    except ValueError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    model = _empty(OmniGen2Transformer, config)
    return scaled_fp8.fill_as_stored(model, state, scales, dtype, what, f"{LABEL} transformer ({what})")


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's path (nodes.checkpoint.flow_transformers.transformer_file). The module is built whole
    (no build straight into disk blocks: ``offload`` is not asked)."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import omnigen2

    return transformer_file(state, name, dtype, fp8, build_transformer, omnigen2.FAMILY, LABEL)
