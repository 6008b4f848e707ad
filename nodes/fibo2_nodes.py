"""FIBO 2's prompt node with ComfyUI's name and inputs: TextEncodeFibo2 (ComfyUI's image_fibo2_* templates).

It gives the positive, the negative and the blank latent at once: the prompt as BriaFibo2Pipeline
encodes a generation prompt (a JSON caption cleaned and serialised compactly), the negative as the
pipeline encodes its ``negative_prompt`` (as written; empty: the null caption FIBO 2 was trained with),
and FLUX.2's 128-channel latent at the result size (0: 1024, else floored to 16 pixels, as the
templates' note says). The family's rules are nodes.families.fibo2. The pictures to edit are read by
Qwen3-VL's vision tower, which Kiln does not load: a linked picture is refused by its input name.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Grow, Input, Output, define_node
from nodes.handles import ClipHandle, VaeHandle
from nodes.latent_ops import MAX_RESOLUTION

#: The pictures to edit: images.image_1 .. image_5 (BriaFibo2Pipeline edits up to five at once).
IMAGES = Grow("images", min=0, names=tuple(f"image_{k}" for k in range(1, 6)), template="image")
DEFAULT_SIZE = 1024
DOWNSCALE = 16


def _side(value: int, name: str) -> int:
    value = int(value)
    if value == 0:
        return DEFAULT_SIZE
    if value < DOWNSCALE:
        raise NodeError(f"must be 0 (1024) or at least {DOWNSCALE} pixels, got {value}", name)
    return value // DOWNSCALE * DOWNSCALE


@define_node(
    "TextEncodeFibo2",
    category="advanced/conditioning",
    inputs=[
        Input("clip", T.CLIP, tooltip="Qwen3-VL 4B: CLIPLoader type fibo2"),
        *IMAGES.inputs(T.IMAGE, tooltip="A picture to edit (needs Qwen3-VL's vision tower: not supported yet)"),
        Input("vae", T.VAE, optional=True),
        Input("prompt", T.STRING, default="", multiline=True,
              tooltip="A structured JSON caption (cleaned as FIBO 2's training cleaned captions) or plain text"),
        Input("negative_prompt", T.STRING, default="", multiline=True,
              tooltip="Encoded as written; empty: the null caption FIBO 2 was trained with"),
        Input("width", T.INT, default=0, min=0, max=MAX_RESOLUTION, tooltip="0: 1024; else floored to 16"),
        Input("height", T.INT, default=0, min=0, max=MAX_RESOLUTION, tooltip="0: 1024; else floored to 16"),
        Input("batch_size", T.INT, default=1, min=1, max=4096),
    ],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING), Output("latent", T.LATENT)],
)
def text_encode_fibo2(ctx, clip: Any, prompt: str = "", negative_prompt: str = "", width: int = 0, height: int = 0,
                      batch_size: int = 1, vae: Any = None, **images: Any):
    """(positive, negative, blank latent) for FIBO 2 text to image, as BriaFibo2Pipeline encodes them."""
    import torch

    from nodes.families import fibo2
    from nodes.families.base import ConditioningError

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if clip.family is not fibo2.FAMILY:
        raise NodeError(f"this CLIP is {clip.family.name}'s; TextEncodeFibo2 needs Qwen3-VL 4B loaded with "
                        "CLIPLoader type fibo2 (qwen3vl_4b*.safetensors)", "clip")
    given = [i.name for i in IMAGES.inputs(T.IMAGE) if images.get(i.name) is not None]
    if given:
        raise NodeError(fibo2.NO_PICTURES, given[0])
    if vae is not None and not isinstance(vae, VaeHandle):
        raise NodeError(f"vae must come from a VAE loader, got {type(vae).__name__}", "vae")
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(value, str):
            raise NodeError("must be a string", name)
    h, w = _side(height, "height"), _side(width, "width")
    try:
        positive = clip.encode(prompt)
        negative = fibo2.encode_raw(clip, negative_prompt or fibo2.NULL_CAPTION)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    latent = torch.zeros(int(batch_size), fibo2.FAMILY.latent.channels, h // DOWNSCALE, w // DOWNSCALE)
    return positive, negative, {"samples": latent}
