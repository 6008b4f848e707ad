"""HunyuanImage 2.1's own node with ComfyUI's name and inputs: EmptyHunyuanImageLatent.

The family (network, text encoding, flow sampling) is nodes.families.hunyuan_image; this node gives the
empty latent ComfyUI's does: 64 channels, one cell per 32 pixels (the VAE's compression), default 2048 x
2048, sizes in steps of 32.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.budget import Size
from engine.node import Input, Output, define_node
from nodes.families.hunyuan_image import HUNYUAN_IMAGE_LATENT

from nodes.latent_ops import MAX_RESOLUTION
#: Pixels per latent cell and the latent's channels.
MULTIPLE, CHANNELS = HUNYUAN_IMAGE_LATENT.downscale, HUNYUAN_IMAGE_LATENT.channels


@define_node(
    "EmptyHunyuanImageLatent",
    category="latent",
    inputs=[
        Input("width", T.INT, default=2048, min=64, max=MAX_RESOLUTION, step=32),
        Input("height", T.INT, default=2048, min=64, max=MAX_RESOLUTION, step=32),
        Input("batch_size", T.INT, default=1, min=1, max=4096),
    ],
    outputs=[Output("LATENT", T.LATENT)],
    size=Size(width="width", height="height", batch="batch_size"),
)
def empty_hunyuan_image_latent(ctx, width: int = 2048, height: int = 2048, batch_size: int = 1):
    """A blank HunyuanImage 2.1 latent: zeros [batch, 64, height/32, width/32]. A size that is not a
    multiple of 32 is refused naming the input (the VAE's cells are 32 pixels; ComfyUI would floor it)."""
    import torch

    for name, value in (("width", width), ("height", height)):
        if int(value) % MULTIPLE:
            raise NodeError(f"{name} {value} is not a multiple of {MULTIPLE}: HunyuanImage 2.1's VAE makes one latent "
                            f"cell per {MULTIPLE}x{MULTIPLE} pixels (try {int(value) // MULTIPLE * MULTIPLE})", name)
    return ({"samples": torch.zeros([int(batch_size), CHANNELS, int(height) // MULTIPLE, int(width) // MULTIPLE])},)
