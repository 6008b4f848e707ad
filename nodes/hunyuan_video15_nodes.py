"""HunyuanVideo 1.5's empty latent with ComfyUI's name and inputs: EmptyHunyuanVideo15Latent.

The family (network, text encoding, flow sampling) is nodes.families.hunyuan_video15. ComfyUI's node makes a
video latent [batch, 32, (length - 1) / 4 + 1, height / 16, width / 16]; Kiln makes pictures, so a ``length``
of one latent frame (1 to 4 frames; the Capybara image templates ask for 1) gives that frame as the image
latent it is, [batch, 32, height / 16, width / 16], and a longer one is refused naming the input.
"""
from __future__ import annotations

from engine import types as T
from engine.budget import Size
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.families.hunyuan_video15 import HUNYUAN_VIDEO15_LATENT
from nodes.latent_ops import MAX_RESOLUTION

#: Pixels per latent cell, frames per latent frame after the first, the latent's channels.
MULTIPLE, TEMPORAL, CHANNELS = HUNYUAN_VIDEO15_LATENT.downscale, 4, HUNYUAN_VIDEO15_LATENT.channels


@define_node(
    "EmptyHunyuanVideo15Latent",
    category="latent/video",
    display_name="Empty HunyuanVideo 1.5 Latent",
    inputs=[
        Input("width", T.INT, default=848, min=16, max=MAX_RESOLUTION, step=16),
        Input("height", T.INT, default=480, min=16, max=MAX_RESOLUTION, step=16),
        Input("length", T.INT, default=25, min=1, max=MAX_RESOLUTION, step=4),
        Input("batch_size", T.INT, default=1, min=1, max=4096),
    ],
    outputs=[Output("LATENT", T.LATENT)],
    size=Size(width="width", height="height", batch="batch_size"),
)
def empty_hunyuan_video15_latent(ctx, width: int = 848, height: int = 480, length: int = 25, batch_size: int = 1):
    """A blank one-frame HunyuanVideo 1.5 latent: zeros [batch, 32, height/16, width/16] (sizes floored to
    16 pixels, as ComfyUI's). More than one latent frame is refused: Kiln samples pictures."""
    import torch

    frames = (int(length) - 1) // TEMPORAL + 1
    if frames != 1:
        raise NodeError(f"length {length} makes {frames} latent frames; Kiln makes pictures with HunyuanVideo 1.5 "
                        f"(Capybara): use a length of 1 (one frame)", "length")
    return ({"samples": torch.zeros([int(batch_size), CHANNELS, int(height) // MULTIPLE, int(width) // MULTIPLE])},)
