"""FIBO 2 transformer weights: the file layout of ``fibo2_*.safetensors`` and diffusers' BriaFibo2Transformer2DModel.

Bria's release (``briaai/Fibo-2.0-dev``) ships the transformer under diffusers' own names
(``x_embedder``, ``t_embedder.mlp``, ``noise_refiner.N``, ``perceiver.latent_queries`` /
``perceiver.layers.N``, ``layers.N.attention.to_q`` ..., ``final_layer``); Comfy-Org's repack
(``fibo2_dev_int8_convrot.safetensors`` and siblings) is read here as those names, bare or under
ComfyUI's ``model.diffusion_model.``. The int8_convrot / fp8_scaled scales beside the weights are
taken by nodes.checkpoint.scaled_fp8 before this module sees the keys. So both "layouts" are one
and the conversions are the identity; the key-module interface (nodes.checkpoint.flux_load.
transformer_from_file, paged_files.keyed_layout) is kept so FIBO 2 loads by the same rule as the
other flow transformers.

What the weights do not show (the gist-token schedule, rotary axes, rope theta) is the release's
config, proportional to what the shapes give (:func:`transformer_config`).
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import UNET_PREFIX, has_keys, strip  # noqa: F401 (the key modules' interface)
from nodes.checkpoint.z_image_keys import rope_axes

#: A FIBO 2 transformer has a Perceiver resampler with learned gist queries; no other family does.
MARKER = "perceiver.latent_queries"
PATCH = 2


class KeyMismatch(ValueError):
    """Keys that do not fit the FIBO 2 layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, MARKER)


is_diffusers = is_original


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    return dict(state)


diffusers_to_original = original_to_diffusers


def _count(shapes: Any, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes for m in [rx.match(k)] if m})


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """BriaFibo2Transformer2DModel arguments from the shapes (prefix or not). The release's gist schedule
    (256..512 gist tokens in steps of 64 over 256..2048 text tokens) is kept in proportion to the learned
    queries' count, and its rotary axes (32, 48, 48) in proportion to the head width."""
    s = strip(dict(shapes))
    try:
        dim, patch_in = s["x_embedder.weight"]
        head = s["layers.0.attention.norm_q.weight"][0]
        gists = s[MARKER][0]
        cap = s["perceiver.layers.0.cross_attention.to_k.weight"][1]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    layers = _count(s, r"^layers\.(\d+)\.")
    injection = tuple(_count(s, r"^layers\.(\d+)\.cross_attention\.to_k\.weight$"))
    if not layers or not injection:
        raise KeyMismatch("no layers.N blocks with cross_attention (the text injection blocks)")
    return dict(in_channels=patch_in // (PATCH * PATCH), patch_size=PATCH, dim=dim, n_layers=len(layers),
                n_refiner_layers=len(_count(s, r"^noise_refiner\.(\d+)\.")), n_heads=dim // head, norm_eps=1e-5,
                cap_feat_dim=cap, injection_layer_ids=injection,
                perceiver_num_layers=len(_count(s, r"^perceiver\.layers\.(\d+)\.")),
                min_num_gist_tokens=gists // 2, max_num_gist_tokens=gists, gist_step=max(1, gists // 8),
                gist_min_text_len=gists // 2, gist_max_text_len=gists * 4, rope_theta=256.0, t_scale=1000.0,
                axes_dims=tuple(rope_axes(head)), axes_lens=(2048, 512, 512))
