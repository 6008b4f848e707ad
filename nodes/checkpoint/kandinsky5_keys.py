"""Kandinsky 5.0 transformer weights: one key layout for the release, ComfyUI and diffusers.

Kandinsky Lab's ``kandinsky5lite_t2i.safetensors`` (what ComfyUI's template loads with UNETLoader) names
the DiT as its reference code does: ``time_embeddings``, ``text_embeddings``, ``pooled_text_embeddings``,
``visual_embeddings``, ``text_transformer_blocks.N`` (``text_modulation``, ``self_attention``,
``feed_forward``), ``visual_transformer_blocks.N`` (``visual_modulation``, ``self_attention``,
``cross_attention``, ``feed_forward``) and ``out_layer``. diffusers' ``Kandinsky5Transformer3DModel``
kept every one of those names (its rotary tables are buffers it does not save), so both layouts are the
same and the conversion is the identity; ComfyUI's saved checkpoints add ``model.diffusion_model.``
(taken off by :func:`strip`). What the layout cannot tell apart, :func:`transformer_config` reads from
the shapes: a visual input of 2C+1 channels per patch is a video / image-to-image model (its visual
conditioning), which Kiln does not run.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint.flux_keys import (  # noqa: F401 (the key modules' interface)
    UNET_PREFIX, count_matches, has_keys, strip)

#: Detection keys (both layouts alike): the pooled CLIP projection and a visual block's modulation.
MARKERS = ("pooled_text_embeddings.in_layer.weight", "visual_transformer_blocks.0.visual_modulation.out_layer.weight")
#: The released patch (1 frame, 2x2 pixels of latent); the weights show only its product.
PATCH = (1, 2, 2)


class KeyMismatch(ValueError):
    """Keys that do not fit the Kandinsky 5 layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, *MARKERS)


def is_diffusers(keys: Any) -> bool:
    """Never a separate layout (the module docstring): files are read as the original."""
    return False


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """The identity (one layout); a key of another model's layout is left for the strict load to name."""
    return dict(state)


diffusers_to_original = original_to_diffusers


def rope_axes(head: int) -> tuple[int, int, int]:
    """The rotary split of a head: the release's (16, 24, 24) for 64 wide; other widths keep a quarter
    for time and split the rest evenly between rows and columns."""
    t = head // 4
    return (t, (head - t) // 2, (head - t) // 2)


class UnsupportedVariant(KeyMismatch):
    """A Kandinsky 5 model of a variant Kiln does not run (visual conditioning: video, image editing)."""


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Kandinsky5Transformer3DModel arguments from the shapes (prefix or not)."""
    s = strip(dict(shapes))
    try:
        model_dim, text_dim = s["text_embeddings.in_layer.weight"]
        time_dim, pooled_dim = s["pooled_text_embeddings.in_layer.weight"]
        visual_in = s["visual_embeddings.in_layer.weight"][1]
        visual_out = s["out_layer.out_layer.weight"][0]
        head = s["visual_transformer_blocks.0.self_attention.query_norm.weight"][0]
        ff_dim = s["visual_transformer_blocks.0.feed_forward.in_layer.weight"][0]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    cells = PATCH[0] * PATCH[1] * PATCH[2]
    channels_in, channels = visual_in // cells, visual_out // cells
    if channels_in != channels:
        raise UnsupportedVariant(
            f"its visual input has {channels_in} channels per patch cell for {channels} latent channels (visual "
            "conditioning: a Kandinsky 5 video or image-editing model); Kiln runs Kandinsky 5 text to image "
            "(kandinsky5lite_t2i)")
    return dict(in_visual_dim=channels, out_visual_dim=channels, in_text_dim=text_dim, in_text_dim2=pooled_dim,
                time_dim=time_dim, patch_size=PATCH, model_dim=model_dim, ff_dim=ff_dim,
                num_text_blocks=count_matches(s, r"^text_transformer_blocks\.(\d+)\."),
                num_visual_blocks=count_matches(s, r"^visual_transformer_blocks\.(\d+)\."),
                axes_dims=rope_axes(head), visual_cond=False)


def original_names(names: Any) -> dict[str, str]:
    """diffusers name -> the original name of the same tensor (the same)."""
    return {name: name for name in names}


def lora_modules(names: Any) -> dict[str, str]:
    """Original module name -> weight name for every linear weight (the names are shared)."""
    return {name[: -len(".weight")]: name for name in names if name.endswith(".weight")}
