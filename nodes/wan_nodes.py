"""WanImageToVideo and ScaleROPE with ComfyUI's names, inputs and outputs: what ChronoEdit's template
adds to a Wan 2.1 image-to-video model (nodes.families.wan).

* **WanImageToVideo** (comfy_extras/nodes_wan.py): an empty video latent [batch, 16, (length - 1) / 4 + 1,
  height / 8, width / 8]; given a start image, its frames (resized to width x height, bilinear, centre cut)
  followed by grey frames up to ``length`` are encoded by the VAE as one video into ``concat_latent_image``,
  with ``concat_mask`` 0 on the latent frames the start image covers and 1 after; given a
  clip_vision_output, it goes on both prompts too. The family reads all three (nodes.families.wan).
* **ScaleROPE** (comfy_extras/nodes_rope.py): the rotary positions along x, y and t become
  ``shift + index * scale`` (ComfyUI's ``set_model_rope_options``). Kiln applies it to Wan's transformer,
  whose rotary table it computes itself (nodes.checkpoint.wan_rope); other families are refused by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.conditioning_nodes import with_options
from nodes.handles import ModelHandle, VaeHandle
from nodes.latent_ops import MAX_RESOLUTION
from nodes.style_model import CLIP_VISION_OUTPUT

#: Wan's VAE: 8 pixels a latent cell, 4 frames a latent frame after the first.
SPATIAL, TEMPORAL = 8, 4


@define_node(
    "WanImageToVideo",
    category="conditioning/video_models",
    inputs=[Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING), Input("vae", T.VAE),
            Input("width", T.INT, default=832, min=16, max=MAX_RESOLUTION, step=16),
            Input("height", T.INT, default=480, min=16, max=MAX_RESOLUTION, step=16),
            Input("length", T.INT, default=81, min=1, max=MAX_RESOLUTION, step=4),
            Input("batch_size", T.INT, default=1, min=1, max=4096),
            Input("clip_vision_output", CLIP_VISION_OUTPUT, optional=True),
            Input("start_image", T.IMAGE, optional=True)],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING), Output("latent", T.LATENT)],
)
def wan_image_to_video(ctx, positive: Any, negative: Any, vae: Any, width: int, height: int, length: int,
                       batch_size: int, clip_vision_output: Any = None, start_image: Any = None):
    """The prompts with the start image's video latent, its mask and the CLIP vision states, and the empty
    video latent to sample (see the module docstring)."""
    import torch

    from nodes.families.wan import CLIP_VISION, CONCAT_LATENT, CONCAT_MASK
    from nodes.resample import resize

    if not isinstance(vae, VaeHandle):
        raise NodeError(f"vae must come from a VAE loader, got {type(vae).__name__}", "vae")
    width, height, length = int(width), int(height), int(length)
    if width % 16 or height % 16:
        raise NodeError(f"width and height must be multiples of 16, got {width}x{height}", "width")
    frames = (length - 1) // TEMPORAL + 1
    latent = torch.zeros(int(batch_size), 16, frames, height // SPATIAL, width // SPATIAL)
    values: dict[str, Any] = {}
    if start_image is not None:
        if getattr(start_image, "ndim", None) != 4 or start_image.shape[-1] < 3:
            raise NodeError("is not an IMAGE ([batch, height, width, 3])", "start_image")
        given = start_image[:length, :, :, :3].to(torch.float32)
        given = resize(given.movedim(-1, 1), width, height, "bilinear", crop="center").movedim(1, -1)
        video = torch.full((length, height, width, 3), 0.5)
        video[:given.shape[0]] = given
        try:
            encoded = vae.encode_video(video)
        except ValueError as exc:
            raise NodeError(str(exc), "vae") from None
        mask = torch.ones(1, 1, frames, encoded.shape[-2], encoded.shape[-1])
        mask[:, :, :(given.shape[0] - 1) // TEMPORAL + 1] = 0.0
        values.update({CONCAT_LATENT: encoded, CONCAT_MASK: mask})
    if clip_vision_output is not None:
        if getattr(clip_vision_output, "penultimate_hidden_states", None) is None:
            raise NodeError("must come from CLIPVisionEncode", "clip_vision_output")
        values[CLIP_VISION] = clip_vision_output
    return (with_options(positive, "positive", **values), with_options(negative, "negative", **values),
            {"samples": latent})


@define_node(
    "ScaleROPE",
    category="advanced/model_patches",
    inputs=[Input("model", T.MODEL),
            Input("scale_x", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.1),
            Input("shift_x", T.FLOAT, default=0.0, min=-256.0, max=256.0, step=0.1),
            Input("scale_y", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.1),
            Input("shift_y", T.FLOAT, default=0.0, min=-256.0, max=256.0, step=0.1),
            Input("scale_t", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.1),
            Input("shift_t", T.FLOAT, default=0.0, min=-256.0, max=256.0, step=0.1)],
    outputs=[Output("MODEL", T.MODEL)],
)
def scale_rope(ctx, model: Any, scale_x: float, shift_x: float, scale_y: float, shift_y: float, scale_t: float,
               shift_t: float):
    """A MODEL whose rotary positions along each axis are ``shift + index * scale`` while it samples (a
    network patch the sampling loop sets, as ComfyUI's rope_options model option; the handle it was given
    keeps its own)."""
    from nodes.checkpoint.wan_rope import OPTION_NAMES, rope_of

    if not isinstance(model, ModelHandle):
        raise NodeError(f"model must come from a model loader, got {type(model).__name__}", "model")
    if rope_of(model.peek()) is None:
        raise NodeError(f"Kiln applies ScaleROPE to Wan 2.1 / ChronoEdit models; this {model.family.name} model's "
                        "rotary positions are not scaled (remove ScaleROPE)", "model")
    options = dict(zip(OPTION_NAMES, (float(v) for v in (scale_x, shift_x, scale_y, shift_y, scale_t, shift_t))))
    return (dataclasses.replace(model, patches=dataclasses.replace(model.patches, rope=tuple(options.items()))),)
