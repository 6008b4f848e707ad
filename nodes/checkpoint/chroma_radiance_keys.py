"""Chroma1-Radiance weights: ComfyUI's file layout <-> Kiln's ChromaRadianceTransformer.

A Radiance file is Chroma's original layout (nodes.checkpoint.chroma_keys) without ``img_in.*`` and
``final_layer.*``, plus the pixel ends (nodes.checkpoint.chroma_radiance_net), which keep their file names
in the module: ``img_in_patch.*``, ``nerf_image_embedder.embedder.0.*``, ``nerf_blocks.{i}.param_generator.*``
and ``nerf_blocks.{i}.norm.scale``, and ``nerf_final_layer_conv.{norm.scale,conv.*}`` (or the older
``nerf_final_layer.{norm.scale,linear.*}``). The trunk's rows are Chroma's table under ``trunk.``. The empty
``__x0__`` tensor marks a file that predicts the clean image (ComfyUI's x0 mode); it is a flag, not a weight.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import chroma_keys, flux_keys
from nodes.checkpoint.flux_keys import KeyMismatch  # noqa: F401  (the loader catches keys.KeyMismatch)

#: The key ComfyUI's detection tells Radiance by (its first NeRF block's norm).
MARKER = "nerf_blocks.0.norm.scale"
#: The x0-prediction flag (an empty tensor in the file).
X0 = "__x0__"
TRUNK = "trunk."
_LATENT_ENDS = ("img_in.", "final_layer.")
_CONV_HEAD = "nerf_final_layer_conv."
_LINEAR_HEAD = "nerf_final_layer."


def _nerf_blocks(keys: Any) -> list[int]:
    return flux_keys._blocks(keys, "nerf_blocks.")


def _own_names(keys: Any) -> list[str]:
    """The pixel ends' names for the key set's block count and head kind (the names both sides share)."""
    wb = ("weight", "bias")
    names = [f"img_in_patch.{s}" for s in wb] + [f"nerf_image_embedder.embedder.0.{s}" for s in wb]
    for i in _nerf_blocks(keys):
        names += [f"nerf_blocks.{i}.param_generator.{s}" for s in wb] + [f"nerf_blocks.{i}.norm.scale"]
    if any(k.startswith(_CONV_HEAD) for k in keys) or not any(k.startswith(_LINEAR_HEAD) for k in keys):
        names += [f"{_CONV_HEAD}norm.scale"] + [f"{_CONV_HEAD}conv.{s}" for s in wb]
    else:
        names += [f"{_LINEAR_HEAD}norm.scale"] + [f"{_LINEAR_HEAD}linear.{s}" for s in wb]
    return names


def pairs(original_keys: Any, model_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """(file names, module names, how) for every tensor; ``how`` as in nodes.checkpoint.flux_keys."""
    original_keys, model_keys = list(original_keys), list(model_keys)
    trunk_keys = [k[len(TRUNK):] for k in model_keys if k.startswith(TRUNK)]
    rows = [(o, [TRUNK + d for d in ds], how) for o, ds, how in chroma_keys.pairs(original_keys, trunk_keys)
            if not o[0].startswith(_LATENT_ENDS)]
    return rows + [([n], [n], "rename") for n in _own_names(original_keys or model_keys)]


#: ComfyUI's ``model.diffusion_model.`` taken off (nodes.checkpoint.flux_keys.strip).
strip = flux_keys.strip


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(file name, module names, how) for every tensor of a file's key set (the x0 flag left out).
    Raises :class:`~nodes.checkpoint.flux_keys.KeyMismatch` naming missing and left-over keys."""
    return flux_keys.plan_from(pairs, [k for k in keys if k != X0])


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """The module's tensors from a file's (prefix stripped, the x0 flag dropped)."""
    state = {k: v for k, v in strip(dict(state)).items() if k != X0}
    return flux_keys.to_diffusers(state, plan, int(state["img_in_patch.weight"].shape[0]))


def diffusers_to_original(state: dict[str, Any], x0: bool = False) -> dict[str, Any]:
    """A file's tensors from the module's state dict (the inverse; ``x0`` adds the flag)."""
    import torch

    out = flux_keys.to_original(state, pairs)
    return {**out, X0: torch.zeros(0)} if x0 else out


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """ChromaRadianceTransformer's arguments from a file's shapes (Chroma's rule for the trunk)."""
    s = strip(dict(shapes))
    hidden, channels, patch, _ = s["img_in_patch.weight"]
    nerf_hidden, embed_in = s["nerf_image_embedder.embedder.0.weight"]
    freqs = round((embed_in - channels) ** 0.5)
    if freqs * freqs != embed_in - channels:
        raise KeyError(f"nerf_image_embedder.embedder.0.weight of {embed_in} inputs for {channels} channels")
    generated = s[f"nerf_blocks.{_nerf_blocks(s)[0]}.param_generator.weight"][0] if _nerf_blocks(s) else 0
    trunk = chroma_keys.transformer_config({**s, "img_in.weight": (hidden, hidden)})
    return dict(trunk_config=trunk, channels=channels, patch_size=patch, nerf_hidden=nerf_hidden,
                nerf_depth=len(_nerf_blocks(s)), nerf_mlp_ratio=generated // (3 * nerf_hidden * nerf_hidden),
                nerf_freqs=freqs, head="conv" if any(k.startswith(_CONV_HEAD) for k in s) else "linear",
                x0=X0 in s, joint_attention_dim=trunk["joint_attention_dim"])
