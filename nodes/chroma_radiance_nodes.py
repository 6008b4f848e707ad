"""Chroma1-Radiance's nodes with ComfyUI's names and inputs: EmptyChromaRadianceLatentImage and
ChromaRadianceOptions.

The family is nodes.families.chroma_radiance; its "latent" is the image, 3 channels at full size.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.families.chroma_radiance import RADIANCE_LATENT
from nodes.handles import ModelHandle
from nodes.latent_ops import EMPTY_LATENT_SIZE, empty_latent_inputs


@define_node(
    "EmptyChromaRadianceLatentImage",
    category="latent/chroma_radiance",
    inputs=empty_latent_inputs(16),
    outputs=[Output("LATENT", T.LATENT)],
    size=EMPTY_LATENT_SIZE,
)
def empty_chroma_radiance_latent_image(ctx, width: int = 1024, height: int = 1024, batch_size: int = 1):
    """A blank Radiance "latent": zeros [batch, 3, height, width], the pixels themselves (ComfyUI's node)."""
    import torch

    return ({"samples": torch.zeros([int(batch_size), RADIANCE_LATENT.channels, int(height), int(width)])},)


@define_node(
    "ChromaRadianceOptions",
    category="model_patches/chroma_radiance",
    inputs=[
        Input("model", T.MODEL),
        Input("preserve_wrapper", T.BOOLEAN, default=True,
              tooltip="ComfyUI: delegate to an earlier model function wrapper (Kiln has none to delegate to)."),
        Input("start_sigma", T.FLOAT, default=1.0, min=0.0, max=1.0,
              tooltip="First sigma that these options will be in effect."),
        Input("end_sigma", T.FLOAT, default=0.0, min=0.0, max=1.0,
              tooltip="Last sigma that these options will be in effect."),
        Input("nerf_tile_size", T.INT, default=-1, min=-1,
              tooltip="NeRF head patches decoded at once: -1 the default (512), 0 all at once."),
    ],
    outputs=[Output("MODEL", T.MODEL)],
)
def chroma_radiance_options(ctx, model: ModelHandle, preserve_wrapper: bool = True, start_sigma: float = 1.0,
                            end_sigma: float = 0.0, nerf_tile_size: int = -1) -> tuple[Any]:
    """ComfyUI's node overrides the NeRF head's tile size between two sigmas; -1 overrides nothing and hands
    the model back unchanged, as ComfyUI's does. The tile size only decides how many patches the head decodes
    at once (memory and speed): every patch is computed alone, so the picture is the same at any size
    (tests/test_chroma_radiance.py). Kiln records the setting on the model and decodes in its default tiles."""
    if getattr(model.family, "name", "") != "chroma_radiance":
        raise NodeError(f"ChromaRadianceOptions needs a Chroma1-Radiance model, got {model.family.name}", "model")
    if int(nerf_tile_size) < 0:
        return (model,)
    ctx.message(f"ChromaRadianceOptions: nerf_tile_size {int(nerf_tile_size)} for sigma {end_sigma}..{start_sigma} "
                "is a memory setting; the image does not depend on it and Kiln decodes in its default tiles")
    options = {"nerf_tile_size": int(nerf_tile_size), "start_sigma": float(start_sigma),
               "end_sigma": float(end_sigma)}
    return (dataclasses.replace(model, extra={**model.extra, "chroma_radiance_options": options}),)
