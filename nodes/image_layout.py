"""ComfyUI's layout nodes: ImageScaleToMaxDimension, ResizeAndPadImage, ImageStitch, and
ImageAddNoise, with ComfyUI's names, inputs, defaults and sizes.

The sizes follow ComfyUI's arithmetic on purpose (``round`` for the scaled side of
ImageScaleToMaxDimension, ``int`` truncation in ResizeAndPadImage and ImageStitch), so a
ComfyUI workflow gets images of the same size, pixel for pixel, as it did there. The
resampling itself is ``nodes/resample.py`` (ComfyUI's ``common_upscale`` methods), and
every node that can make a larger image checks the pixel budget for one image first.
An image that already has the size it would be scaled to is used as it is: ComfyUI
resamples it anyway, which changes nothing except with "lanczos", whose 8-bit round
trip rounds the values to 1/255 (a deliberate, sub-level difference).
IMAGE is float32 [B, H, W, C] in 0..1; torch is imported inside the functions so that
listing nodes stays cheap.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.budget import Size
from engine.context import NodeError
from engine.node import Input, Output, define_node

MAX_RESOLUTION = 16384
#: ComfyUI lists "bilinear" twice for this node; the list is kept as ComfyUI serves it so an
#: editor file's widget values and /object_info read the same as there.
MAX_DIMENSION_METHODS = ["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]
PAD_METHODS = ["area", "bicubic", "nearest-exact", "bilinear", "lanczos"]
DIRECTIONS = ["right", "down", "left", "up"]
#: Spacer colours: a grey level for every colour channel, or an RGB triple.
SPACING_COLOURS: dict[str, float | tuple[float, float, float]] = {
    "white": 1.0, "black": 0.0, "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def _resized(ctx, image, width: int, height: int, method: str, input_name: str) -> Any:
    """``image`` [B,H,W,C] at width x height by ``method``, after the pixel budget check."""
    from nodes.resample import check_pixel_budget, resize

    check_pixel_budget(ctx.env, width, height, input_name, "the scaled image")
    if (int(image.shape[1]), int(image.shape[2])) == (height, width):
        return image
    return resize(image.movedim(-1, 1), width, height, method).movedim(1, -1).contiguous()


def max_dimension_size(width: int, height: int, largest: int) -> tuple[int, int]:
    """(width, height) with the longer side ``largest`` and the shorter one rounded to keep the aspect."""
    if height > width:
        return max(1, round(width / height * largest)), largest
    if width > height:
        return largest, max(1, round(height / width * largest))
    return largest, largest


@define_node(
    "ImageScaleToMaxDimension",
    category="image/upscaling",
    inputs=[Input("image", T.IMAGE), Input("upscale_method", T.COMBO, choices=MAX_DIMENSION_METHODS),
            Input("largest_size", T.INT, default=512, min=0, max=MAX_RESOLUTION, step=1,
                  tooltip="Length in pixels of the image's longer side after scaling")],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_scale_to_max_dimension(ctx, image, upscale_method: str, largest_size: int):
    """Scale so the longer side is ``largest_size`` pixels, keeping the aspect ratio (up or down).

    ComfyUI accepts 0 in the widget but then fails inside the resize; here 0 is refused
    with a message instead, since no image has a side of 0 pixels.
    """
    from nodes.masking import as_image

    image = as_image(image)
    if upscale_method not in MAX_DIMENSION_METHODS:
        raise NodeError(f"upscale_method must be one of {', '.join(dict.fromkeys(MAX_DIMENSION_METHODS))}",
                        "upscale_method")
    largest = int(largest_size)
    if largest < 1:
        raise NodeError(f"largest_size must be at least 1 pixel, got {largest_size}", "largest_size")
    width, height = max_dimension_size(int(image.shape[2]), int(image.shape[1]), largest)
    return (_resized(ctx, image, width, height, upscale_method, "largest_size"),)


def fit_inside(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """The largest size of the same aspect that fits the target, each side truncated (ComfyUI's rule)."""
    scale = min(target_width / width, target_height / height)
    return max(1, int(width * scale)), max(1, int(height * scale))


@define_node(
    "ResizeAndPadImage",
    category="image/transform",
    inputs=[Input("image", T.IMAGE),
            Input("target_width", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            Input("target_height", T.INT, default=512, min=1, max=MAX_RESOLUTION, step=1),
            Input("padding_color", T.COMBO, choices=["white", "black"],
                  tooltip="Fill for the bands the scaled image leaves free (every channel, alpha too)"),
            Input("interpolation", T.COMBO, choices=PAD_METHODS)],
    outputs=[Output("IMAGE", T.IMAGE)],
    size=Size(width="target_width", height="target_height", work=2),
)
def resize_and_pad_image(ctx, image, target_width: int, target_height: int, padding_color: str,
                         interpolation: str):
    """Fit the image inside the target size without distorting it, centred, and pad the rest.

    Unlike ImageResize's ``pad`` mode, no rounding to a multiple happens: the result is
    exactly target_width x target_height, as in ComfyUI.
    """
    import torch

    from nodes.masking import as_image
    from nodes.resample import check_pixel_budget

    image = as_image(image)
    if padding_color not in ("white", "black"):
        raise NodeError(f"padding_color must be white or black, got {padding_color!r}", "padding_color")
    if interpolation not in PAD_METHODS:
        raise NodeError(f"interpolation must be one of {', '.join(PAD_METHODS)}", "interpolation")
    out_w, out_h = int(target_width), int(target_height)
    check_pixel_budget(ctx.env, out_w, out_h, "target_width", "the padded image")
    new_w, new_h = fit_inside(int(image.shape[2]), int(image.shape[1]), out_w, out_h)
    scaled = _resized(ctx, image, new_w, new_h, interpolation, "target_width")
    fill = 0.0 if padding_color == "black" else 1.0
    out = torch.full((image.shape[0], out_h, out_w, image.shape[3]), fill, dtype=image.dtype)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    out[:, top:top + new_h, left:left + new_w, :] = scaled
    return (out,)


def _extend_batch(image, batch: int) -> Any:
    """``image`` with its last item repeated until it has ``batch`` items (ComfyUI's stitch rule)."""
    import torch

    if image.shape[0] >= batch:
        return image
    return torch.cat([image, image[-1:].expand(batch - image.shape[0], -1, -1, -1)])


def _centre_pad(image, size: int, dim: int, value: float) -> Any:
    """``image`` padded along ``dim`` (1 height, 2 width) to ``size``, the extra split around it."""
    import torch.nn.functional as F

    extra = size - int(image.shape[dim])
    if extra <= 0:
        return image
    before, after = extra // 2, extra - extra // 2
    pads = (0, 0, before, after) if dim == 2 else (0, 0, 0, 0, before, after)
    return F.pad(image, pads, mode="constant", value=value)


def _match_channels(image1, image2) -> tuple[Any, Any]:
    """Give an RGB image an opaque alpha when the other one is RGBA; refuse any other mismatch.

    ComfyUI pads the image with fewer channels with ones whatever the counts, which turns a
    one-channel image stitched to an RGB one into a wrong colour; only RGB beside RGBA has a
    meaning (an opaque alpha), so that case is followed and the others are an error.
    """
    import torch

    c1, c2 = int(image1.shape[-1]), int(image2.shape[-1])
    if c1 == c2:
        return image1, image2
    if {c1, c2} != {3, 4}:
        raise NodeError(f"image2 has {c2} channel(s) but image1 has {c1}; only RGB beside RGBA can be stitched "
                        f"(the RGB one gets an opaque alpha)", "image2")
    opaque = lambda im: torch.cat([im, torch.ones_like(im[..., :1])], dim=-1)  # noqa: E731
    return (opaque(image1), image2) if c1 == 3 else (image1, opaque(image2))


def _spacer(batch: int, height: int, width: int, channels: int, colour: float | tuple[float, ...], dtype) -> Any:
    """A band of the spacing colour; an alpha channel is opaque."""
    import torch

    band = torch.zeros((batch, height, width, channels), dtype=dtype)
    if isinstance(colour, tuple):
        for i, value in enumerate(colour[:channels]):
            band[..., i] = value
    else:
        band[..., :min(3, channels)] = colour
    if channels == 4:
        band[..., 3] = 1.0
    return band


@define_node(
    "ImageStitch",
    category="image/transform",
    display_name="Image Stitch",
    inputs=[Input("image1", T.IMAGE),
            Input("direction", T.COMBO, default="right", choices=DIRECTIONS,
                  tooltip="Side of image1 where image2 goes"),
            Input("match_image_size", T.BOOLEAN, default=True,
                  tooltip="Scale image2 (Lanczos, aspect kept) to image1's height (right/left) or width (down/up); "
                          "off: centre the smaller one on a band of the spacing colour (black for red/green/blue)"),
            Input("spacing_width", T.INT, default=0, min=0, max=1024, step=2,
                  tooltip="Width of a band between the images; an odd value is raised to the next even one"),
            Input("spacing_color", T.COMBO, default="white", choices=list(SPACING_COLOURS)),
            Input("image2", T.IMAGE, optional=True)],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_stitch(ctx, image1, direction: str, match_image_size: bool, spacing_width: int, spacing_color: str,
                 image2=None):
    """Join image2 to image1 on the side ``direction`` names, with an optional band between them.

    Without image2, image1 passes unchanged. A shorter batch is filled up with copies of
    its last image, as in ComfyUI. One deliberate difference: when image2 already has the
    size it would be scaled to, it is used as it is; ComfyUI runs it through the 8-bit
    Lanczos resize anyway, which rounds its values to 1/255.
    """
    import torch

    from nodes.masking import as_image
    from nodes.resample import check_pixel_budget

    image1 = as_image(image1, "image1")
    if direction not in DIRECTIONS:
        raise NodeError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}", "direction")
    if spacing_color not in SPACING_COLOURS:
        raise NodeError(f"spacing_color must be one of {', '.join(SPACING_COLOURS)}, got {spacing_color!r}",
                        "spacing_color")
    if int(spacing_width) < 0:
        raise NodeError(f"spacing_width must be 0 or more, got {spacing_width}", "spacing_width")
    if image2 is None:
        return (image1,)
    image1, image2 = _match_channels(image1, as_image(image2, "image2"))
    batch = max(image1.shape[0], image2.shape[0])
    image1, image2 = _extend_batch(image1, batch), _extend_batch(image2, batch)
    sideways = direction in ("left", "right")
    h1, w1 = int(image1.shape[1]), int(image1.shape[2])
    h2, w2 = int(image2.shape[1]), int(image2.shape[2])
    colour = SPACING_COLOURS[spacing_color]
    if match_image_size:
        width, height = (int(h1 * (w2 / h2)), h1) if sideways else (w1, int(w1 / (w2 / h2)))
        image2 = _resized(ctx, image2, max(1, width), max(1, height), "lanczos", "image2")
    else:
        fill = 0.0 if isinstance(colour, tuple) else colour
        dim = 1 if sideways else 2
        size = max(int(image1.shape[dim]), int(image2.shape[dim]))
        image1, image2 = _centre_pad(image1, size, dim, fill), _centre_pad(image2, size, dim, fill)
    parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
    gap = int(spacing_width) + int(spacing_width) % 2
    if gap:
        across = max(int(parts[0].shape[1 if sideways else 2]), int(parts[1].shape[1 if sideways else 2]))
        shape = (across, gap) if sideways else (gap, across)
        parts.insert(1, _spacer(batch, *shape, int(image1.shape[-1]), colour, image1.dtype))
    dim = 2 if sideways else 1
    total = sum(int(p.shape[dim]) for p in parts)
    out_w, out_h = (total, int(parts[0].shape[1])) if sideways else (int(parts[0].shape[2]), total)
    check_pixel_budget(ctx.env, out_w, out_h, "image2", "the stitched image")
    return (torch.cat([p.to(image1.dtype) for p in parts], dim=dim),)


@define_node(
    "ImageAddNoise",
    category="image",
    inputs=[Input("image", T.IMAGE),
            Input("seed", T.INT, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                  tooltip="Seed of the noise: the same seed gives the same grain"),
            Input("strength", T.FLOAT, default=0.5, min=0.0, max=1.0, step=0.01,
                  tooltip="Standard deviation of the Gaussian noise added to every channel")],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_add_noise(ctx, image, seed: int, strength: float):
    """Add Gaussian noise of standard deviation ``strength`` to every pixel, then clip to 0..1.

    The noise is drawn on the CPU from a ``torch.Generator`` seeded with ``seed``, one
    value per element of the batch in order, so it is the very noise ComfyUI draws (it
    seeds torch's global generator with ``torch.manual_seed`` and draws the same way);
    the difference is that Kiln leaves the global generator alone, so other nodes'
    randomness does not depend on whether this node ran. Like ComfyUI, an alpha channel
    gets noise too.
    """
    import torch

    from nodes.masking import as_image

    image = as_image(image)
    seed = int(seed)
    if not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
        raise NodeError(f"seed must be between 0 and 2^64 - 1, got {seed}", "seed")
    if not 0.0 <= float(strength) <= 1.0:
        raise NodeError(f"strength must be between 0 and 1, got {strength}", "strength")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(tuple(image.shape), generator=generator, device="cpu", dtype=torch.float32)
    return (torch.clamp(image + float(strength) * noise.to(image.dtype), 0.0, 1.0),)
