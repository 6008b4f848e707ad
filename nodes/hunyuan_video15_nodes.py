"""HunyuanVideo 1.5's nodes with ComfyUI's names and inputs: EmptyHunyuanVideo15Latent and
HunyuanVideo15ImageToVideo (the Capybara image-edit template's conditioning node).

The family (network, text encoding, flow sampling) is nodes.families.hunyuan_video15. ComfyUI's node makes a
video latent [batch, 32, (length - 1) / 4 + 1, height / 16, width / 16]; Kiln makes pictures, so a ``length``
of one latent frame (1 to 4 frames; the Capybara image templates ask for 1) gives that frame as the image
latent it is, [batch, 32, height / 16, width / 16], and a longer one is refused naming the input.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.budget import Size
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.conditioning_nodes import with_options
from nodes.families.hunyuan_video15 import HUNYUAN_VIDEO15_LATENT
from nodes.handles import VaeHandle
from nodes.latent_ops import MAX_RESOLUTION
from nodes.style_model import CLIP_VISION_OUTPUT

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

    _one_frame(length)
    return ({"samples": torch.zeros([int(batch_size), CHANNELS, int(height) // MULTIPLE, int(width) // MULTIPLE])},)


@define_node(
    "HunyuanVideo15ImageToVideo",
    category="conditioning/video_models",
    inputs=[Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING), Input("vae", T.VAE),
            Input("width", T.INT, default=848, min=16, max=MAX_RESOLUTION, step=16),
            Input("height", T.INT, default=480, min=16, max=MAX_RESOLUTION, step=16),
            Input("length", T.INT, default=33, min=1, max=MAX_RESOLUTION, step=4),
            Input("batch_size", T.INT, default=1, min=1, max=4096),
            Input("start_image", T.IMAGE, optional=True),
            Input("clip_vision_output", CLIP_VISION_OUTPUT, optional=True)],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING), Output("latent", T.LATENT)],
)
def hunyuan_video15_image_to_video(ctx, positive: Any, negative: Any, vae: Any, width: int, height: int,
                                   length: int, batch_size: int, start_image: Any = None,
                                   clip_vision_output: Any = None):
    """ComfyUI's node on one frame: the empty latent [batch, 32, height/16, width/16] and, on both prompts,
    the start picture (resized to width x height, bilinear, centre cut) encoded by the VAE with ComfyUI's
    ``concat_mask`` (0 on its frame), and the clip_vision_output; the family reads them
    (nodes.families.hunyuan_video15). More than one latent frame is refused naming ``length``."""
    import torch

    from nodes.families.hunyuan_video15 import CLIP_VISION, CONCAT_LATENT, CONCAT_MASK
    from nodes.resample import resize

    if not isinstance(vae, VaeHandle):
        raise NodeError(f"vae must come from a VAE loader, got {type(vae).__name__}", "vae")
    width, height, length = int(width), int(height), int(length)
    _one_frame(length)
    latent = torch.zeros(int(batch_size), CHANNELS, height // MULTIPLE, width // MULTIPLE)
    values: dict[str, Any] = {}
    if start_image is not None:
        if getattr(start_image, "ndim", None) != 4 or start_image.shape[-1] < 3:
            raise NodeError("is not an IMAGE ([batch, height, width, 3])", "start_image")
        given = start_image[:1, :, :, :3].to(torch.float32)
        given = resize(given.movedim(-1, 1), width, height, "bilinear", crop="center").movedim(1, -1)
        if vae.latent_channels != CHANNELS:
            raise NodeError(f"this VAE makes {vae.latent_channels}-channel latents; HunyuanVideo 1.5 needs its own "
                            "(hunyuanvideo15_vae)", "vae")
        encoded = vae.encode(given)
        values.update({CONCAT_LATENT: encoded[:1], CONCAT_MASK: torch.zeros(1, 1, *encoded.shape[-2:])})
    if clip_vision_output is not None:
        if getattr(clip_vision_output, "last_hidden_state", None) is None:
            raise NodeError("must come from CLIPVisionEncode", "clip_vision_output")
        values[CLIP_VISION] = clip_vision_output
    return (with_options(positive, "positive", **values), with_options(negative, "negative", **values),
            {"samples": latent})


def _one_frame(length: int) -> None:
    """Refuse a ``length`` of more than one latent frame (Kiln samples pictures)."""
    frames = (int(length) - 1) // TEMPORAL + 1
    if frames != 1:
        raise NodeError(f"length {length} makes {frames} latent frames; Kiln makes pictures with HunyuanVideo 1.5 "
                        f"(Capybara): use a length of 1 (one frame)", "length")
