"""ComfyUI's newer ResizeImageMaskNode ("Resize Image/Mask") and BatchImagesNode ("Batch Images"),
which 43 and 40 of its current templates use, following ``comfy_extras/nodes_post_processing.py``.

Both use ComfyUI's newer schema features. ResizeImageMaskNode's ``resize_type`` is a dynamic
combo: each way of resizing brings its own inputs, declared here as ``resize_type.width``,
``resize_type.megapixels``, ... (the names ComfyUI's API form and editor files use) and listed
per choice in :data:`RESIZE_OPTIONS`, from which the editor-file converter reads the widget
layout. BatchImagesNode's images are a growing list of sockets ``images.image0`` ..
``images.image49`` (at least two), declared once as a :class:`~engine.node.Grow`. Resizing uses Kiln's one resampler (:func:`nodes.resample.resize`,
ComfyUI's common_upscale), and every size is checked against the pixel budget.
"""
from __future__ import annotations

import math
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Grow, Input, Output, define_node
from nodes.resample import CROP_METHODS, IMAGE_METHODS, check_pixel_budget, resize

MAX_RESOLUTION = 16384
IMAGE_OR_MASK = "IMAGE,MASK"
#: ComfyUI's resize types, in its order, with the sub-inputs each brings.
RESIZE_OPTIONS: dict[str, tuple[str, ...]] = {
    "scale dimensions": ("width", "height", "crop"),
    "scale by multiplier": ("multiplier",),
    "scale longer dimension": ("longer_size",),
    "scale shorter dimension": ("shorter_size",),
    "scale width": ("width",),
    "scale height": ("height",),
    "scale total pixels": ("megapixels",),
    "match size": ("match", "crop"),
    "scale to multiple": ("multiple",),
}


def _side(name: str, tooltip: str) -> Input:
    return Input(f"resize_type.{name}", T.INT, default=512, min=0, max=MAX_RESOLUTION, step=1, optional=True,
                  tooltip=tooltip)


RESIZE_SUB_INPUTS = [
    _side("width", "Target width; 0 follows the height's aspect ratio"),
    _side("height", "Target height; 0 follows the width's aspect ratio"),
    Input("resize_type.crop", T.COMBO, default="center", choices=CROP_METHODS, optional=True,
          tooltip="disabled stretches to the size; center crops to keep the aspect ratio"),
    Input("resize_type.multiplier", T.FLOAT, default=1.0, min=0.01, max=8.0, step=0.01, optional=True),
    _side("longer_size", "The longer side becomes this; the aspect ratio is kept"),
    _side("shorter_size", "The shorter side becomes this; the aspect ratio is kept"),
    Input("resize_type.megapixels", T.FLOAT, default=1.0, min=0.01, max=16.0, step=0.01, optional=True),
    Input("resize_type.match", IMAGE_OR_MASK, optional=True, tooltip="Take this image's or mask's size"),
    Input("resize_type.multiple", T.INT, default=8, min=1, max=MAX_RESOLUTION, step=1, optional=True,
          tooltip="Scale to cover, then crop the centre so both sides divide by this"),
]


def _channels_first(x: Any) -> tuple[Any, bool]:
    """[B,C,H,W] for the resampler, and whether ``x`` was an image (masks are [B,H,W])."""
    if x.ndim == 4:
        return x.movedim(-1, 1), True
    if x.ndim == 3:
        return x.unsqueeze(1), False
    raise NodeError(f"expected an IMAGE [B,H,W,C] or a MASK [B,H,W], got shape {tuple(x.shape)}", "input")


def _back(x: Any, was_image: bool) -> Any:
    return (x.movedim(1, -1) if was_image else x.squeeze(1)).contiguous()


def target_size(choice: str, width: int, height: int, options: dict[str, Any]) -> tuple[int, int]:
    """The size ``choice`` asks for from a width x height source (ComfyUI's rules and rounding)."""
    if choice == "scale by multiplier":
        m = options["resize_type.multiplier"]
        return round(width * m), round(height * m)
    if choice in ("scale dimensions", "scale width", "scale height"):
        w = options["resize_type.width"] if choice != "scale height" else 0
        h = options["resize_type.height"] if choice != "scale width" else 0
        if w == 0 and h == 0:
            return width, height
        if w == 0:
            w = max(1, round(width * h / height))
        elif h == 0:
            h = max(1, round(height * w / width))
        return w, h
    if choice in ("scale longer dimension", "scale shorter dimension"):
        longer = choice == "scale longer dimension"
        size = options["resize_type.longer_size" if longer else "resize_type.shorter_size"]
        if width == height:
            return size, size
        if (height > width) == longer:  # the height is the side that becomes ``size``
            return round(width / height * size), size
        return size, round(height / width * size)
    if choice == "scale total pixels":
        scale = math.sqrt(int(options["resize_type.megapixels"] * 1024 * 1024) / (width * height))
        return round(width * scale), round(height * scale)
    raise NodeError(f"unknown resize type '{choice}'", "resize_type")


def _to_multiple(x: Any, multiple: int, method: str) -> Any:
    """Cover the nearest smaller size whose sides divide by ``multiple``, then crop the centre."""
    height, width = x.shape[-2], x.shape[-1]
    target_w, target_h = width // multiple * multiple, height // multiple * multiple
    if multiple <= 1 or target_w == 0 or target_h == 0 or (target_w, target_h) == (width, height):
        return x
    if target_w / width >= target_h / height:
        scaled_w, scaled_h = target_w, max(target_h, math.ceil(height * target_w / width))
    else:
        scaled_w, scaled_h = max(target_w, math.ceil(width * target_h / height)), target_h
    x = resize(x, scaled_w, scaled_h, method)
    top, left = (scaled_h - target_h) // 2, (scaled_w - target_w) // 2
    return x[..., top:top + target_h, left:left + target_w]


@define_node(
    "ResizeImageMaskNode",
    category="transform",
    display_name="Resize Image/Mask",
    inputs=[
        Input("input", IMAGE_OR_MASK),
        Input("resize_type", T.COMBO, default="scale dimensions", choices=list(RESIZE_OPTIONS),
              dynamic=RESIZE_OPTIONS, tooltip="How to resize: to a size, by a factor, to another image's size, ..."),
        Input("scale_method", T.COMBO, default="area", choices=IMAGE_METHODS),
        *RESIZE_SUB_INPUTS,
    ],
    outputs=[Output("resized", IMAGE_OR_MASK)],
)
def resize_image_mask(ctx, input, resize_type: str, scale_method: str, **options: Any):
    """Resize an image or a mask in one of ComfyUI's nine ways (to a size, by a factor, a side to a
    length, to a pixel count, to another image's size, to a multiple); the result is the same kind."""
    x, was_image = _channels_first(input)
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if resize_type == "scale to multiple":
        return (_back(_to_multiple(x, int(options["resize_type.multiple"]), scale_method), was_image),)
    crop = "disabled"
    if resize_type == "match size":
        match = options.get("resize_type.match")
        if match is None:
            raise NodeError("'match size' needs an image or mask linked to resize_type.match", "resize_type.match")
        if match.ndim not in (3, 4):
            raise NodeError(f"expected an IMAGE or a MASK, got shape {tuple(match.shape)}", "resize_type.match")
        new_w, new_h = int(match.shape[2]), int(match.shape[1])
        crop = options["resize_type.crop"]
    else:
        if resize_type == "scale dimensions":
            if options["resize_type.width"] == 0 and options["resize_type.height"] == 0:
                return (input,)  # nothing asked: the input as it is, as in ComfyUI
            crop = options["resize_type.crop"]
        new_w, new_h = target_size(resize_type, width, height, options)
    check_pixel_budget(ctx.env, new_w, new_h, "resize_type")
    return (_back(resize(x, new_w, new_h, scale_method, crop), was_image),)


#: ComfyUI's growing image sockets: images.image0 .. images.image49, the first two required.
IMAGES = Grow("images", min=2, prefix="image", count=50, template="image")
IMAGE_SLOTS = [f"images.{name}" for name in IMAGES.slot_names()]


@define_node(
    "BatchImagesNode",
    category="image",
    display_name="Batch Images",
    inputs=IMAGES.inputs(T.IMAGE),
    outputs=[Output("IMAGE", T.IMAGE)],
)
def batch_images(ctx, **images: Any):
    """One batch from the linked images, in slot order: each is given the first image's size
    (bilinear, centre-cropped to its aspect ratio) and the most channels of any (an added alpha
    channel is opaque), as ComfyUI's node does."""
    import torch

    linked = [(name, images[name]) for name in IMAGE_SLOTS if images.get(name) is not None]
    for name, image in linked:
        if image.ndim != 4:
            raise NodeError(f"expected an IMAGE [B,H,W,C], got shape {tuple(image.shape)}", name)
    channels = max(image.shape[-1] for _, image in linked)
    first = linked[0][1]
    out = []
    for _, image in linked:
        if image.shape[-1] < channels:
            pad = torch.ones(*image.shape[:-1], channels - image.shape[-1], dtype=image.dtype)
            image = torch.cat([image, pad], dim=-1)
        if image.shape[1:3] != first.shape[1:3]:
            scaled = resize(image.movedim(-1, 1), int(first.shape[2]), int(first.shape[1]), "bilinear", "center")
            image = scaled.movedim(1, -1)
        out.append(image.to(first.dtype))
    return (torch.cat(out, dim=0),)
