"""ComfyUI's image post-processing filters: ImageBlur, ImageSharpen, ImageQuantize, with its
names, inputs and defaults (ImageBlend is in image_ops).

Blur and sharpen convolve each colour channel with ComfyUI's kernel: a Gaussian sampled
on [-1, 1] across the kernel's width (so ``sigma`` is relative to the radius, not in
pixels), the image mirrored at its edges (clamped instead where it is too small to
mirror). An alpha channel is kept as it is: it is transparency, not colour.
"""
from __future__ import annotations

import math

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

DITHERS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


def gaussian_kernel(size: int, sigma: float):
    """A size x size Gaussian over [-1, 1]^2, summing to 1."""
    import torch

    axis = torch.linspace(-1, 1, size, dtype=torch.float64)
    squared = axis[:, None] ** 2 + axis[None, :] ** 2
    g = torch.exp(-squared / (2.0 * sigma * sigma))
    return (g / g.sum()).to(torch.float32)


def _colour_and_alpha(image):
    """(colour channels, alpha or None) of an IMAGE."""
    from nodes.masking import as_image

    image = as_image(image)
    return (image[..., :3], image[..., 3:]) if image.shape[-1] == 4 else (image, None)


def _with_alpha(colour, alpha):
    import torch

    return colour if alpha is None else torch.cat([colour, alpha], dim=-1)


def _convolve_colour(image, kernel):
    """Each colour channel convolved with ``kernel`` (odd size), edges mirrored; alpha kept."""
    import torch
    import torch.nn.functional as F

    colour, alpha = _colour_and_alpha(image)
    channels, pad = colour.shape[-1], kernel.shape[-1] // 2
    x = colour.permute(0, 3, 1, 2).to(torch.float32)
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    out = F.conv2d(x, kernel.expand(channels, 1, *kernel.shape), groups=channels).permute(0, 2, 3, 1)
    return out, alpha


@define_node("ImageBlur", category="image/postprocessing",
             inputs=[Input("image", T.IMAGE), Input("blur_radius", T.INT, default=1, min=1, max=31),
                     Input("sigma", T.FLOAT, default=1.0, min=0.1, max=10.0, step=0.1)],
             outputs=[Output("IMAGE", T.IMAGE)])
def image_blur(ctx, image, blur_radius: int, sigma: float):
    """Gaussian blur over a (2 radius + 1)-pixel square."""
    if int(blur_radius) < 1:
        raise NodeError(f"blur_radius must be at least 1, got {blur_radius}", "blur_radius")
    if float(sigma) <= 0:
        raise NodeError(f"sigma must be above 0, got {sigma}", "sigma")
    return (_with_alpha(*_convolve_colour(image, gaussian_kernel(2 * int(blur_radius) + 1, float(sigma)))),)


@define_node("ImageSharpen", category="image/postprocessing",
             inputs=[Input("image", T.IMAGE), Input("sharpen_radius", T.INT, default=1, min=1, max=31),
                     Input("sigma", T.FLOAT, default=1.0, min=0.1, max=10.0, step=0.01),
                     Input("alpha", T.FLOAT, default=1.0, min=0.0, max=5.0, step=0.01)],
             outputs=[Output("IMAGE", T.IMAGE)])
def image_sharpen(ctx, image, sharpen_radius: int, sigma: float, alpha: float):
    """Unsharp masking in one kernel: the Gaussian scaled by -10 alpha, its centre raised so the
    kernel sums to 1 (flat areas keep their colour, edges are pushed apart), clamped to 0..1."""
    if int(sharpen_radius) < 1:
        raise NodeError(f"sharpen_radius must be at least 1, got {sharpen_radius}", "sharpen_radius")
    if float(sigma) <= 0:
        raise NodeError(f"sigma must be above 0, got {sigma}", "sigma")
    size = 2 * int(sharpen_radius) + 1
    kernel = gaussian_kernel(size, float(sigma)) * -(float(alpha) * 10)
    centre = size // 2
    kernel[centre, centre] += 1.0 - kernel.sum()
    colour, alpha = _convolve_colour(image, kernel)
    return (_with_alpha(colour.clamp(0, 1), alpha),)


def _bayer_thresholds(order: int):
    """The order x order Bayer threshold map, values (k + 0.5) / order^2 - 0.5 for k = 0..order^2-1."""
    import numpy as np

    m = np.zeros((1, 1))
    while m.shape[0] < order:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return (m + 0.5) / m.size - 0.5


@define_node("ImageQuantize", category="image/postprocessing",
             inputs=[Input("image", T.IMAGE), Input("colors", T.INT, default=256, min=1, max=256),
                     Input("dither", T.COMBO, default="none", choices=DITHERS)],
             outputs=[Output("IMAGE", T.IMAGE)])
def image_quantize(ctx, image, colors: int, dither: str):
    """Each image reduced to a palette of ``colors`` colours chosen for it (Pillow's median cut),
    with no dithering, Floyd-Steinberg error diffusion, or ordered (Bayer) dithering whose
    threshold map is spread over one palette step. Alpha is kept."""
    import numpy as np
    import torch
    from PIL import Image

    from nodes.image_io import to_pil

    colour, alpha = _colour_and_alpha(image)
    if dither not in DITHERS:
        raise NodeError(f"dither must be one of {', '.join(DITHERS)}", "dither")
    colors = int(colors)
    if not 1 <= colors <= 256:
        raise NodeError(f"colors must be between 1 and 256, got {colors}", "colors")
    mode = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
    reduced = []
    for item in colour:
        rgb = to_pil(item.expand(-1, -1, 3)).convert("RGB")  # a grey image quantizes as RGB
        palette = rgb.quantize(colors=colors)
        if dither.startswith("bayer-"):
            order = int(dither.split("-")[1])
            tiles = np.tile(_bayer_thresholds(order), (math.ceil(rgb.height / order), math.ceil(rgb.width / order)))
            shifted = np.asarray(rgb, dtype=np.float32) + (256.0 / colors) * tiles[:rgb.height, :rgb.width, None]
            rgb = Image.fromarray(np.clip(np.rint(shifted), 0, 255).astype(np.uint8), mode="RGB")
        pixels = np.asarray(rgb.quantize(palette=palette, dither=mode).convert("RGB"), dtype=np.float32) / 255.0
        reduced.append(torch.from_numpy(pixels)[..., :colour.shape[-1]])
    return (_with_alpha(torch.stack(reduced), alpha),)
