"""Image operations with ComfyUI's names, inputs and semantics.

ImageScale, ImageScaleBy, ImageScaleToTotalPixels, ImageCrop, ImagePadForOutpaint,
ImageInvert, ImageBlend, ImageCompositeMasked, ImageBatch, RepeatImageBatch,
ImageFromBatch. IMAGE is float32 [B, H, W, C] in 0..1. The resize methods are in
``nodes/resample.py`` (one rule for images and latents), the mask rules in
``nodes/masking.py``. Every node that makes a larger image checks the pixel budget
for one image first (``settings.max_image_pixels``).
"""
from __future__ import annotations

import math

from engine import types as T
from engine.context import NodeError
from engine.budget import Size
from engine.node import Input, Output, define_node
from nodes.resample import CROP_METHODS, IMAGE_METHODS

MAX_RESOLUTION = 16384


def _scaled(ctx, image, width: int, height: int, method: str, crop: str = "disabled", input_name: str = "image"):
    """``image`` [B,H,W,C] resized to width x height (after the budget check)."""
    from nodes.resample import check_pixel_budget, resize

    if method not in IMAGE_METHODS:
        raise NodeError(f"upscale_method must be one of {', '.join(IMAGE_METHODS)}", "upscale_method")
    check_pixel_budget(ctx.env, width, height, input_name, "the scaled image")
    if (int(image.shape[1]), int(image.shape[2])) == (height, width) and crop == "disabled":
        return image
    return resize(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1).contiguous()


@define_node(
    "ImageScale",
    category="image/upscaling",
    display_name="Upscale Image",
    inputs=[Input("image", T.IMAGE), Input("upscale_method", T.COMBO, choices=IMAGE_METHODS),
            Input("width", T.INT, default=512, min=0, max=MAX_RESOLUTION, step=1,
                  tooltip="0: follow the height, keeping the aspect ratio"),
            Input("height", T.INT, default=512, min=0, max=MAX_RESOLUTION, step=1,
                  tooltip="0: follow the width, keeping the aspect ratio"),
            Input("crop", T.COMBO, choices=CROP_METHODS,
                  tooltip="center: cut the excess around the centre first so the aspect ratio is kept")],
    outputs=[Output("IMAGE", T.IMAGE)],
    size=Size(width="width", height="height", like="image", work=2),
)
def image_scale(ctx, image, upscale_method: str, width: int, height: int, crop: str):
    """Resize to width x height (0 for one side keeps the aspect ratio; both 0 keeps the image)."""
    from nodes.masking import as_image

    image = as_image(image)
    width, height = int(width), int(height)
    if width == 0 and height == 0:
        return (image,)
    if width == 0:
        width = max(1, round(image.shape[2] * height / image.shape[1]))
    elif height == 0:
        height = max(1, round(image.shape[1] * width / image.shape[2]))
    return (_scaled(ctx, image, width, height, upscale_method, crop),)


@define_node(
    "ImageScaleBy",
    category="image/upscaling",
    display_name="Upscale Image By",
    inputs=[Input("image", T.IMAGE), Input("upscale_method", T.COMBO, choices=IMAGE_METHODS),
            Input("scale_by", T.FLOAT, default=1.0, min=0.01, max=8.0, step=0.01)],
    outputs=[Output("IMAGE", T.IMAGE)],
    size=Size(scale="scale_by", work=2),
)
def image_scale_by(ctx, image, upscale_method: str, scale_by: float):
    """Resize by a factor; each side is rounded to the nearest pixel."""
    from nodes.masking import as_image

    image = as_image(image)
    width, height = round(image.shape[2] * float(scale_by)), round(image.shape[1] * float(scale_by))
    return (_scaled(ctx, image, max(1, width), max(1, height), upscale_method, input_name="scale_by"),)


@define_node(
    "ImageScaleToTotalPixels",
    category="image/upscaling",
    display_name="Scale Image to Total Pixels",
    inputs=[Input("image", T.IMAGE), Input("upscale_method", T.COMBO, choices=IMAGE_METHODS),
            Input("megapixels", T.FLOAT, default=1.0, min=0.01, max=16.0, step=0.01,
                  tooltip="Target size in units of 1024x1024 pixels"),
            Input("resolution_steps", T.INT, default=1, min=1, max=256, optional=True,
                  tooltip="Round each side to a multiple of this (8 for an SD VAE)")],
    outputs=[Output("IMAGE", T.IMAGE)],
    size=Size(megapixels="megapixels", work=2),
)
def image_scale_to_total_pixels(ctx, image, upscale_method: str, megapixels: float, resolution_steps: int = 1):
    """Resize, keeping the aspect ratio, to about ``megapixels`` x 1024 x 1024 pixels."""
    from nodes.masking import as_image

    image = as_image(image)
    step = max(1, int(resolution_steps))
    scale = math.sqrt(float(megapixels) * 1024 * 1024 / (image.shape[1] * image.shape[2]))
    width = max(step, round(image.shape[2] * scale / step) * step)
    height = max(step, round(image.shape[1] * scale / step) * step)
    return (_scaled(ctx, image, width, height, upscale_method, input_name="megapixels"),)


@define_node(
    "ImageCrop",
    category="image/transform",
    display_name="Crop Image",
    inputs=[Input("image", T.IMAGE),
            Input("width", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            Input("height", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1)],
    outputs=[Output("IMAGE", T.IMAGE)],
    size=Size(width="width", height="height"),
)
def image_crop(ctx, image, width: int, height: int, x: int, y: int):
    """The width x height region from (x, y); a start past the edge moves to the last pixel (ComfyUI's rule)."""
    from nodes.masking import as_image

    image = as_image(image)
    h, w = int(image.shape[1]), int(image.shape[2])
    x, y = min(int(x), w - 1), min(int(y), h - 1)
    out = image[:, y:y + int(height), x:x + int(width), :]
    if (out.shape[1], out.shape[2]) != (int(height), int(width)):
        ctx.message(f"the crop reaches past the image's edge: the result is {out.shape[2]}x{out.shape[1]}")
    return (out.contiguous(),)


def pad_mask(height: int, width: int, left: int, top: int, right: int, bottom: int, feathering: int):
    """ImagePadForOutpaint's mask [1, H+top+bottom, W+left+right]: 1 on the new border.

    Inside the original image, a pixel at distance d < feathering from a padded
    side gets ((feathering - d) / feathering)^2, so the repainted region fades into
    the kept one (ComfyUI's rule, only applied when 2 * feathering fits both sides).
    """
    import torch

    mask = torch.ones((height + top + bottom, width + left + right))
    inner = torch.zeros((height, width))
    if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
        i = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
        j = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
        far = torch.full((height, width), float(max(height, width)))
        d = torch.stack([i if top else far, (height - i) if bottom else far,
                         j if left else far, (width - j) if right else far]).amin(0)
        v = (feathering - d) / feathering
        inner = torch.where(d < feathering, v * v, inner)
    mask[top:top + height, left:left + width] = inner
    return mask.unsqueeze(0)


@define_node(
    "ImagePadForOutpaint",
    category="image/transform",
    display_name="Pad Image for Outpainting",
    inputs=[Input("image", T.IMAGE)]
    + [Input(side, T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8) for side in ("left", "top", "right", "bottom")]
    + [Input("feathering", T.INT, default=40, min=0, max=MAX_RESOLUTION, step=1,
             tooltip="Pixels over which the mask fades into the original image")],
    outputs=[Output("IMAGE", T.IMAGE), Output("MASK", T.MASK)],
    size=Size(pad=("left", "top", "right", "bottom"), work=2),
)
def image_pad_for_outpaint(ctx, image, left: int, top: int, right: int, bottom: int, feathering: int):
    """Extend the canvas with grey (0.5) and return the mask of what to paint (the new border).

    A result larger than the budget for one image is refused before anything is
    allocated.
    """
    import torch

    from nodes.masking import as_image
    from nodes.resample import check_pixel_budget

    image = as_image(image)
    b, h, w, c = image.shape
    left, top, right, bottom = (int(v) for v in (left, top, right, bottom))
    sides = {"left": left, "top": top, "right": right, "bottom": bottom}
    biggest = max(sides, key=sides.get)
    check_pixel_budget(ctx.env, w + left + right, h + top + bottom, biggest, "the padded image")
    out = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=torch.float32)
    out[:, top:top + h, left:left + w, :] = image
    if not any(sides.values()):
        ctx.message("nothing to pad: every side is 0, so the mask is empty")
    return (out, pad_mask(h, w, left, top, right, bottom, int(feathering)))


@define_node(
    "ImageInvert",
    category="image/color",
    display_name="Invert Image Colors",
    inputs=[Input("image", T.IMAGE)],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_invert(ctx, image):
    """1 - colour; an alpha channel is kept as it is (it is transparency, not colour)."""
    from nodes.masking import as_image

    image = as_image(image)
    out = 1.0 - image
    if image.shape[-1] == 4:
        out[..., 3] = image[..., 3]
    return (out,)


def match_alpha(a, b):
    """Give both images an alpha channel (opaque) when one of them has one."""
    import torch.nn.functional as F

    if a.shape[-1] == 4 and b.shape[-1] == 3:
        b = F.pad(b, (0, 1), value=1.0)
    elif b.shape[-1] == 4 and a.shape[-1] == 3:
        a = F.pad(a, (0, 1), value=1.0)
    return a, b


BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]


def blend_colours(a, b, mode: str):
    """ComfyUI's ImageBlend modes: the colour that replaces ``a`` where ``b`` lies on it."""
    import torch

    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
    if mode == "difference":
        return a - b
    raise NodeError(f"blend_mode must be one of {', '.join(BLEND_MODES)}", "blend_mode")


@define_node(
    "ImageBlend",
    category="image/filters",
    display_name="Blend Images",
    inputs=[Input("image1", T.IMAGE), Input("image2", T.IMAGE),
            Input("blend_factor", T.FLOAT, default=0.5, min=0.0, max=1.0, step=0.01),
            Input("blend_mode", T.COMBO, choices=BLEND_MODES)],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_blend(ctx, image1, image2, blend_factor: float, blend_mode: str):
    """image1 * (1 - factor) + mode(image1, image2) * factor, clamped to 0..1.

    image2 of another size is first scaled (bicubic, centre-cropped to the aspect
    ratio) to image1's size, as ComfyUI does, and the node says so.
    """
    from nodes.masking import as_image, repeat_to_batch
    from nodes.resample import resize

    image1, image2 = match_alpha(as_image(image1, "image1"), as_image(image2, "image2"))
    if image1.shape[1:3] != image2.shape[1:3]:
        ctx.message(f"image2 scaled from {image2.shape[2]}x{image2.shape[1]} to {image1.shape[2]}x{image1.shape[1]} "
                    f"(bicubic, centre crop)")
        image2 = resize(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bicubic", "center").movedim(1, -1)
    image2 = repeat_to_batch(image2, image1.shape[0])
    factor = float(blend_factor)
    out = (image1 * (1 - factor) + blend_colours(image1, image2, blend_mode) * factor).clamp(0.0, 1.0)
    if image1.shape[-1] == 4:
        out[..., 3] = image1[..., 3]
    return (out,)


@define_node(
    "ImageCompositeMasked",
    category="image/compositing",
    display_name="Image Composite Masked",
    inputs=[Input("destination", T.IMAGE), Input("source", T.IMAGE),
            Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=1),
            Input("resize_source", T.BOOLEAN, default=False),
            Input("mask", T.MASK, optional=True, tooltip="1 = take the source; fitted to the source's size")],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_composite_masked(ctx, destination, source, x: int, y: int, resize_source: bool = False, mask=None):
    """Paste ``source`` onto ``destination`` at (x, y), through ``mask`` when given.

    A mask of another size than the source is resized or refused by the mask size
    rule (``nodes/masking.py``); an empty mask leaves the destination as it is and
    says so.
    """
    from nodes.masking import as_image, composite

    destination, source = match_alpha(as_image(destination, "destination"), as_image(source, "source"))
    out = composite(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, bool(resize_source),
                    message=ctx.message)
    return (out.movedim(1, -1).contiguous(),)


@define_node(
    "ImageBatch",
    category="image/batch",
    display_name="Batch Images",
    inputs=[Input("image1", T.IMAGE), Input("image2", T.IMAGE)],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_batch(ctx, image1, image2):
    """image1's images followed by image2's; image2 of another size is scaled to image1's (bilinear, centre crop)."""
    import torch

    from nodes.masking import as_image
    from nodes.resample import resize

    image1, image2 = match_alpha(as_image(image1, "image1"), as_image(image2, "image2"))
    if image1.shape[1:3] != image2.shape[1:3]:
        ctx.message(f"image2 scaled from {image2.shape[2]}x{image2.shape[1]} to {image1.shape[2]}x{image1.shape[1]} "
                    f"(bilinear, centre crop)")
        image2 = resize(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear", "center").movedim(1, -1)
    return (torch.cat((image1, image2), dim=0),)


@define_node(
    "RepeatImageBatch",
    category="image/batch",
    display_name="Repeat Image Batch",
    inputs=[Input("image", T.IMAGE), Input("amount", T.INT, default=1, min=1, max=4096)],
    outputs=[Output("IMAGE", T.IMAGE)],
    size=Size(repeat="amount"),
)
def repeat_image_batch(ctx, image, amount: int):
    """The batch repeated ``amount`` times."""
    from nodes.masking import as_image

    return (as_image(image).repeat((int(amount), 1, 1, 1)),)


@define_node("ImageFlip", category="image/transform",
             inputs=[Input("image", T.IMAGE), Input("flip_method", T.COMBO, choices=["x-axis: vertically",
                                                                                    "y-axis: horizontally"])],
             outputs=[Output("IMAGE", T.IMAGE)])
def image_flip(ctx, image, flip_method: str):
    """Mirror the image: ``x-axis`` turns it upside down, ``y-axis`` left to right."""
    from nodes.latent_math import FLIPS
    from nodes.masking import as_image

    if flip_method not in FLIPS:
        raise NodeError(f"flip_method must be one of {', '.join(FLIPS)}", "flip_method")
    return (as_image(image).flip(1 if FLIPS[flip_method] == "height" else 2),)


@define_node("ImageRotate", category="image/transform",
             inputs=[Input("image", T.IMAGE),
                     Input("rotation", T.COMBO, choices=["none", "90 degrees", "180 degrees", "270 degrees"])],
             outputs=[Output("IMAGE", T.IMAGE)])
def image_rotate(ctx, image, rotation: str):
    """Turn the image clockwise by quarter turns."""
    import torch

    from nodes.latent_math import ROTATIONS
    from nodes.masking import as_image

    if rotation not in ROTATIONS:
        raise NodeError(f"rotation must be one of {', '.join(ROTATIONS)}", "rotation")
    return (torch.rot90(as_image(image), k=ROTATIONS[rotation], dims=[2, 1]),)


@define_node("EmptyImage", category="image",
             inputs=[Input("width", T.INT, default=512, min=1, max=MAX_RESOLUTION),
                     Input("height", T.INT, default=512, min=1, max=MAX_RESOLUTION),
                     Input("batch_size", T.INT, default=1, min=1, max=4096),
                     Input("color", T.INT, default=0, min=0, max=0xFFFFFF)],
             outputs=[Output("IMAGE", T.IMAGE)],
             size=Size(width="width", height="height", batch="batch_size"))
def empty_image(ctx, width: int, height: int, batch_size: int, color: int):
    """A batch of one-colour images; ``color`` is 0xRRGGBB."""
    import torch

    from nodes.resample import check_pixel_budget

    check_pixel_budget(ctx.env, int(width), int(height), "width", "the image")
    rgb = torch.tensor([(int(color) >> shift) & 0xFF for shift in (16, 8, 0)], dtype=torch.float32) / 255.0
    return (rgb.expand(int(batch_size), int(height), int(width), 3).clone(),)


def batch_slice(size: int, batch_index: int, length: int) -> tuple[int, int]:
    """(start, length) of ComfyUI's *FromBatch: a negative index counts from the end; both clamp into the batch."""
    if batch_index < 0:
        batch_index += size
    start = max(0, min(size - 1, batch_index))
    return start, min(size - start, length)


@define_node(
    "ImageFromBatch",
    category="image/batch",
    display_name="Get Image from Batch",
    inputs=[Input("image", T.IMAGE),
            Input("batch_index", T.INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION,
                  tooltip="First image to take (negative: from the end)"),
            Input("length", T.INT, default=1, min=1, max=4096)],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_from_batch(ctx, image, batch_index: int, length: int):
    """``length`` images of the batch from ``batch_index``."""
    from nodes.masking import as_image

    image = as_image(image)
    start, count = batch_slice(image.shape[0], int(batch_index), int(length))
    return (image[start:start + count].clone(),)
