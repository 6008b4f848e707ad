"""Mask nodes with ComfyUI's names, inputs, outputs and semantics.

LoadImageMask, ImageToMask, ImageColorToMask, MaskToImage, MaskPreview, InvertMask,
SolidMask, GrowMask, FeatherMask, ThresholdMask, MaskComposite, CropMask. A MASK is float32
[B, H, W] in 0..1, 1 = the region to act on (see ``nodes/masking.py`` for the
shared rules). torch is imported inside the functions so listing nodes stays cheap.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.budget import Size
from engine.node import Input, Output, Result, define_node
from nodes import image as _image_nodes  # a module, so LoadImage is not registered twice

MAX_RESOLUTION = 16384
CHANNELS = ["red", "green", "blue", "alpha"]


@define_node(
    "LoadImageMask",
    category="mask",
    display_name="Load Image (as Mask)",
    inputs=[_image_nodes.load_image.inputs[0], Input("channel", T.COMBO, choices=["alpha", "red", "green", "blue"],
                                        tooltip="alpha: 1 where the image is transparent (the region to "
                                                "repaint); red/green/blue: that channel's value")],
    outputs=[Output("MASK", T.MASK)],
    validate=_image_nodes.load_image.validate,
    fingerprint=_image_nodes.load_image.fingerprint,
)
def load_image_mask(ctx, image: str, channel: str):
    """Load one channel of an image as a MASK.

    The file is read exactly as LoadImage reads it (same folders, URL rule and
    checks), with the stored colours kept. ``alpha`` gives 1 - alpha, so the
    transparent part is the masked part, as in ComfyUI; an image without alpha then
    gives a 64x64 mask of zeros (nothing masked), also as in ComfyUI.
    """
    if channel not in ("alpha", "red", "green", "blue"):
        raise NodeError(f"channel must be alpha, red, green or blue, got {channel!r}", "channel")
    pixels, mask = _image_nodes.load_image.fn(ctx, image, "none")
    if channel == "alpha":
        if float(mask.abs().sum()) == 0.0:
            ctx.message(f"'{image}' has no transparent pixels: the mask is empty")
        return (mask,)
    return (pixels[..., CHANNELS.index(channel)].contiguous(),)


@define_node(
    "ImageToMask",
    category="mask",
    display_name="Convert Image to Mask",
    inputs=[Input("image", T.IMAGE), Input("channel", T.COMBO, choices=CHANNELS)],
    outputs=[Output("MASK", T.MASK)],
)
def image_to_mask(ctx, image, channel: str):
    """One channel of an IMAGE as a MASK (every image of the batch)."""
    from nodes.masking import as_image

    image = as_image(image)
    if channel not in CHANNELS:
        raise NodeError(f"channel must be one of {', '.join(CHANNELS)}", "channel")
    index = CHANNELS.index(channel)
    if index >= image.shape[-1]:
        raise NodeError(f"the image has {image.shape[-1]} channel(s) and no {channel} channel", "channel")
    return (image[..., index].contiguous(),)


@define_node(
    "MaskToImage",
    category="mask",
    display_name="Convert Mask to Image",
    inputs=[Input("mask", T.MASK)],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def mask_to_image(ctx, mask):
    """A MASK as a grey RGB IMAGE (white = 1)."""
    from nodes.masking import as_mask

    mask = as_mask(mask)
    return (mask.unsqueeze(-1).expand(*mask.shape, 3).contiguous(),)


@define_node(
    "InvertMask",
    category="mask",
    display_name="Invert Mask",
    inputs=[Input("mask", T.MASK)],
    outputs=[Output("MASK", T.MASK)],
)
def invert_mask(ctx, mask):
    """1 - mask: what was marked is not, and the other way round."""
    from nodes.masking import as_mask

    return (1.0 - as_mask(mask),)


@define_node(
    "SolidMask",
    category="mask",
    display_name="Create Solid Mask",
    inputs=[Input("value", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
            Input("width", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            Input("height", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1)],
    outputs=[Output("MASK", T.MASK)],
    size=Size(width="width", height="height", batch=1),
)
def solid_mask(ctx, value: float, width: int, height: int):
    """A [1, height, width] mask filled with ``value``."""
    import torch

    from nodes.resample import check_pixel_budget

    check_pixel_budget(ctx.env, int(width), int(height), "width", "the mask")
    return (torch.full((1, int(height), int(width)), float(value), dtype=torch.float32),)


def grow(mask, expand: int, tapered_corners: bool):
    """Dilate (expand > 0) or erode (expand < 0) ``mask`` [B, H, W] by |expand| pixels.

    Each step takes the maximum (minimum to erode) over a 3x3 neighbourhood: the
    full square, or without its corners when ``tapered_corners`` (so corners round
    off), as ComfyUI's GrowMask does with scipy's grey dilation; pixels outside the
    mask are ignored. The square case is done in one max-pool of side 2|expand|+1,
    which equals |expand| 3x3 steps.
    """
    import torch
    import torch.nn.functional as F

    steps = abs(int(expand))
    if steps == 0:
        return mask.clone()
    x = mask.unsqueeze(1)
    if expand < 0:
        x = -x
    if not tapered_corners:
        k = min(steps, max(x.shape[-2:]))
        x = F.max_pool2d(x, kernel_size=2 * k + 1, stride=1, padding=k)
    else:
        for _ in range(min(steps, x.shape[-2] + x.shape[-1])):  # beyond that nothing changes
            p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
            x = torch.stack([p[..., 1:-1, 1:-1], p[..., :-2, 1:-1], p[..., 2:, 1:-1],
                             p[..., 1:-1, :-2], p[..., 1:-1, 2:]]).amax(0)
    if expand < 0:
        x = -x
    return x.squeeze(1)


@define_node(
    "GrowMask",
    category="mask",
    display_name="Grow Mask",
    inputs=[Input("mask", T.MASK),
            Input("expand", T.INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1,
                  tooltip="Pixels to grow by (negative: shrink)"),
            Input("tapered_corners", T.BOOLEAN, default=True,
                  tooltip="Round the corners off (a 3x3 cross per step instead of a square)")],
    outputs=[Output("MASK", T.MASK)],
)
def grow_mask(ctx, mask, expand: int, tapered_corners: bool = True):
    """Grow the marked region by ``expand`` pixels, or shrink it when negative."""
    from nodes.masking import as_mask

    return (grow(as_mask(mask), int(expand), bool(tapered_corners)),)


def feather(mask, left: int, top: int, right: int, bottom: int):
    """Fade ``mask`` [B, H, W] to zero towards the given edges over that many pixels.

    The pixel at distance d (0-based) from a feathered edge of width n is
    multiplied by (d + 1) / n, as ComfyUI's FeatherMask does; corners multiply both.
    """
    import torch

    out = mask.clone()
    h, w = out.shape[-2:]

    def ramp(n: int, size: int):
        n = min(int(n), size)
        r = torch.ones(size)
        if n > 0:
            r[:n] = (torch.arange(n, dtype=torch.float32) + 1) / n
        return r

    cols = ramp(left, w) * ramp(right, w).flip(0)
    rows = ramp(top, h) * ramp(bottom, h).flip(0)
    return out * rows[:, None] * cols[None, :]


@define_node(
    "FeatherMask",
    category="mask",
    display_name="Feather Mask",
    inputs=[Input("mask", T.MASK)] + [Input(side, T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1)
                                      for side in ("left", "top", "right", "bottom")],
    outputs=[Output("MASK", T.MASK)],
)
def feather_mask(ctx, mask, left: int, top: int, right: int, bottom: int):
    """Fade the mask out linearly towards each edge over the given number of pixels."""
    from nodes.masking import as_mask

    return (feather(as_mask(mask), left, top, right, bottom),)


@define_node(
    "ThresholdMask",
    category="mask",
    display_name="Threshold Mask",
    inputs=[Input("mask", T.MASK), Input("value", T.FLOAT, default=0.5, min=0.0, max=1.0, step=0.01)],
    outputs=[Output("MASK", T.MASK)],
)
def threshold_mask(ctx, mask, value: float):
    """1 where the mask is above ``value``, else 0."""
    from nodes.masking import as_mask

    return ((as_mask(mask) > float(value)).float(),)


OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


def combine(destination, source, x: int, y: int, operation: str, input_name: str = "source"):
    """ComfyUI's MaskComposite: ``source`` combined into ``destination`` at (x, y), clamped to 0..1.

    Outside the source's footprint the destination is unchanged; the logical
    operations round both masks to 0/1 first. A batch of one is used for every
    image of the other's batch.
    """
    import torch

    from nodes.masking import repeat_to_batch

    bd, bs = destination.shape[0], source.shape[0]
    if bd != bs and 1 not in (bd, bs):
        raise NodeError(f"the masks' batches differ ({bd} and {bs}); give one mask or the same number", input_name)
    batch = max(bd, bs)
    out = repeat_to_batch(destination, batch).clone()
    source = repeat_to_batch(source, batch)
    h, w = out.shape[-2:]
    left, top = int(x), int(y)
    right, bottom = min(left + source.shape[-1], w), min(top + source.shape[-2], h)
    if right <= left or bottom <= top:
        return out.clamp(0.0, 1.0)
    src = source[:, :bottom - top, :right - left]
    dst = out[:, top:bottom, left:right]
    if operation == "multiply":
        res = dst * src
    elif operation == "add":
        res = dst + src
    elif operation == "subtract":
        res = dst - src
    elif operation in ("and", "or", "xor"):
        fn = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
        res = fn(dst.round().bool(), src.round().bool()).float()
    else:
        raise NodeError(f"operation must be one of {', '.join(OPERATIONS)}", "operation")
    out[:, top:bottom, left:right] = res
    return out.clamp(0.0, 1.0)


@define_node(
    "MaskComposite",
    category="mask",
    display_name="Combine Masks",
    inputs=[Input("destination", T.MASK), Input("source", T.MASK),
            Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            Input("operation", T.COMBO, choices=OPERATIONS)],
    outputs=[Output("MASK", T.MASK)],
)
def mask_composite(ctx, destination, source, x: int, y: int, operation: str):
    """Combine ``source`` into ``destination`` at (x, y) by multiply, add, subtract, and, or or xor."""
    from nodes.masking import as_mask

    destination, source = as_mask(destination, "destination"), as_mask(source, "source")
    if int(x) >= destination.shape[-1] or int(y) >= destination.shape[-2]:
        ctx.message(f"the source at ({x}, {y}) lies outside the {destination.shape[-1]}x{destination.shape[-2]} "
                    f"destination: nothing is combined")
    return (combine(destination, source, x, y, operation),)


@define_node(
    "CropMask",
    category="mask",
    display_name="Crop Mask",
    inputs=[Input("mask", T.MASK),
            Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            Input("width", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            Input("height", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1)],
    outputs=[Output("MASK", T.MASK)],
)
def crop_mask(ctx, mask, x: int, y: int, width: int, height: int):
    """The part of the mask from (x, y), width x height pixels, cut at the mask's edge."""
    from nodes.masking import as_mask

    mask = as_mask(mask)
    h, w = mask.shape[-2:]
    if int(x) >= w or int(y) >= h:
        raise NodeError(f"the crop starts at ({x}, {y}), outside the {w}x{h} mask", "x" if int(x) >= w else "y")
    out = mask[:, int(y):int(y) + int(height), int(x):int(x) + int(width)]
    if tuple(out.shape[-2:]) != (int(height), int(width)):
        ctx.message(f"the crop reaches past the mask's edge: the result is {out.shape[-1]}x{out.shape[-2]}")
    return (out.contiguous(),)


@define_node(
    "ImageColorToMask",
    category="mask",
    display_name="Image Color to Mask",
    inputs=[Input("image", T.IMAGE),
            Input("color", T.INT, default=0, min=0, max=0xFFFFFF, step=1, extra={"display": "number"},
                  tooltip="The colour to pick as 0xRRGGBB (0 black, 16777215 white)")],
    outputs=[Output("MASK", T.MASK)],
)
def image_color_to_mask(ctx, image, color: int):
    """1 where a pixel has exactly ``color``, 0 elsewhere.

    Each channel is compared as ComfyUI compares it: clipped to 0..1 and rounded to
    8 bits, so a colour read from a PNG matches the pixels it was saved as. An alpha
    channel is not part of the colour.
    """
    import torch

    from nodes.masking import as_image

    image = as_image(image)
    if image.shape[-1] < 3:
        raise NodeError(f"the image has {image.shape[-1]} channel(s); a colour needs red, green and blue", "image")
    color = int(color)
    if not 0 <= color <= 0xFFFFFF:
        raise NodeError(f"color must be between 0 and 0xFFFFFF (16777215), got {color}", "color")
    levels = (image[..., :3].clamp(0.0, 1.0) * 255.0).round().to(torch.int64)
    packed = (levels[..., 0] << 16) | (levels[..., 1] << 8) | levels[..., 2]
    return ((packed == color).to(torch.float32),)


@define_node(
    "MaskPreview",
    category="mask",
    display_name="Preview Mask",
    output_node=True,
    inputs=[Input("mask", T.MASK)],
    # The mask again, as ComfyUI's newer MaskPreview passes it on (its templates link from it), like
    # PreviewImage's images (nodes.image).
    outputs=[Output("mask", T.MASK)],
)
def mask_preview(ctx, mask):
    """Show a mask as a grey image (white = 1) without keeping it, exactly as PreviewImage shows images.

    The grey image is MaskToImage's, and the files are written by PreviewImage itself (the
    temp folder, ``type: temp``), so masks and images preview by one rule. The mask goes on unchanged.
    """
    (grey,) = mask_to_image.fn(ctx, mask)
    return Result(outputs=(mask,), ui=_image_nodes.preview_image.fn(ctx, grey).ui)
