"""ComfyUI's alpha-compositing, morphology and YUV nodes: JoinImageWithAlpha, SplitImageWithAlpha,
PorterDuffImageComposite (``comfy_extras/nodes_compositing.py``), Morphology, ImageRGBToYUV and
ImageYUVToRGB (``comfy_extras/nodes_morphology.py``), with ComfyUI's names, inputs and results.

Alpha and MASK: a MASK marks with 1 what is *transparent* (LoadImage's mask is 1 - alpha), so
these nodes turn a mask into alpha as 1 - mask and back, as ComfyUI's do.

Morphology: ComfyUI calls kornia's grey morphology with a flat square kernel of ones and
kornia's default "geodesic" border (pixels outside the image take no part). Kiln has no
kornia, so :class:`FlatMorphology` builds the same operators from torch's ``max_pool2d``: the
image is padded with -inf (so the border never wins a maximum; +inf for the minimum) and the
k x k window of output pixel i spans inputs i - k//2 .. i - k//2 + k - 1, kornia's window for
odd and even k alike. Opening, closing, gradient and the hats are kornia's compositions of
the two. Values agree with kornia's to float precision for images in 0..1 (kornia pads with
±1e4 instead of ±inf, which only matters for values beyond that).

YUV: kornia's full-range YCbCr (BT.601 luma weights, chroma centred at 0.5, no clamping),
each channel given back as a grey 3-channel image as ComfyUI does.
"""
from __future__ import annotations

from typing import Any, Callable

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

COMPOSITING = "mask/compositing"


# -- alpha <-> mask ---------------------------------------------------------------------------

@define_node("JoinImageWithAlpha", category=COMPOSITING, display_name="Join Image with Alpha",
             inputs=[Input("image", T.IMAGE), Input("alpha", T.MASK)], outputs=[Output("IMAGE", T.IMAGE)])
def join_image_with_alpha(ctx, image, alpha):
    """The image's colour with alpha = 1 - mask as a fourth channel (an existing alpha is replaced,
    a grey image becomes RGB so the result is a 4-channel IMAGE).

    The shorter batch is repeated to the longer one, as ComfyUI does. A mask of another size
    follows Kiln's mask size rule (``nodes/masking.py``): resized (bilinear, as ComfyUI) when
    uniform or of the image's aspect ratio, refused otherwise, where ComfyUI stretches it.
    """
    import torch

    from nodes.masking import as_image, as_mask, fit_mask, repeat_to_batch

    image, mask = as_image(image), as_mask(alpha, "alpha")
    batch = max(image.shape[0], mask.shape[0])
    image, mask = repeat_to_batch(image, batch), repeat_to_batch(mask, batch)
    mask = fit_mask(mask, image.shape[1], image.shape[2], "alpha", ctx.message)
    colour = image[..., :3] if image.shape[-1] >= 3 else image.expand(*image.shape[:3], 3)  # grey as RGB
    return (torch.cat((colour, (1.0 - mask).unsqueeze(-1)), dim=-1),)


@define_node("SplitImageWithAlpha", category=COMPOSITING, display_name="Split Image with Alpha",
             inputs=[Input("image", T.IMAGE)], outputs=[Output("IMAGE", T.IMAGE), Output("MASK", T.MASK)])
def split_image_with_alpha(ctx, image):
    """The colour channels, and 1 - alpha as a MASK (all 0, nothing transparent, without alpha)."""
    import torch

    from nodes.masking import as_image

    image = as_image(image)
    alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
    return (image[..., :3].contiguous(), 1.0 - alpha)


# -- Porter-Duff ------------------------------------------------------------------------------

# Each operator takes premultiplied (source colour, source alpha, destination colour, destination
# alpha) and gives (colour, alpha), premultiplied. The formulas are ComfyUI's, including its
# DARKEN, LIGHTEN and OVERLAY, which differ from the SVG compositing spec's.
Operator = Callable[[Any, Any, Any, Any], "tuple[Any, Any]"]


def _union(sa, da):
    return sa + da - sa * da


def _darken_or_lighten(pick) -> Operator:
    return lambda s, sa, d, da: ((1 - da) * s + (1 - sa) * d + pick(s, d), _union(sa, da))


def _overlay(s, sa, d, da):
    import torch

    colour = torch.where(2 * d < da, 2 * s * d, sa * da - 2 * (da - s) * (sa - d))
    return colour, _union(sa, da)


def _zero(s, sa, d, da):
    import torch

    return torch.zeros_like(d), torch.zeros_like(da)


def _minimum(a, b):
    import torch

    return torch.minimum(a, b)


def _maximum(a, b):
    import torch

    return torch.maximum(a, b)


PORTER_DUFF: dict[str, Operator] = {
    "ADD": lambda s, sa, d, da: ((s + d).clamp(0, 1), (sa + da).clamp(0, 1)),
    "CLEAR": _zero,
    "DARKEN": _darken_or_lighten(_minimum),
    "DST": lambda s, sa, d, da: (d, da),
    "DST_ATOP": lambda s, sa, d, da: (sa * d + (1 - da) * s, sa),
    "DST_IN": lambda s, sa, d, da: (d * sa, sa * da),
    "DST_OUT": lambda s, sa, d, da: ((1 - sa) * d, (1 - sa) * da),
    "DST_OVER": lambda s, sa, d, da: (d + (1 - da) * s, da + (1 - da) * sa),
    "LIGHTEN": _darken_or_lighten(_maximum),
    "MULTIPLY": lambda s, sa, d, da: (s * d, sa * da),
    "OVERLAY": _overlay,
    "SCREEN": lambda s, sa, d, da: (s + d - s * d, _union(sa, da)),
    "SRC": lambda s, sa, d, da: (s, sa),
    "SRC_ATOP": lambda s, sa, d, da: (da * s + (1 - sa) * d, da),
    "SRC_IN": lambda s, sa, d, da: (s * da, sa * da),
    "SRC_OUT": lambda s, sa, d, da: ((1 - da) * s, (1 - da) * sa),
    "SRC_OVER": lambda s, sa, d, da: (s + (1 - sa) * d, sa + (1 - sa) * da),
    "XOR": lambda s, sa, d, da: ((1 - da) * s + (1 - sa) * d, (1 - da) * sa + (1 - sa) * da),
}


def porter_duff(source, source_mask, destination, destination_mask, mode: str) -> tuple[Any, Any]:
    """Composite straight-alpha images [B, H, W, C] given by their MASKs ([B, H, W, 1], 1 =
    transparent); returns the straight colour (clamped to 0..1) and the result's MASK.

    A result alpha at or below 1e-5 gives black, as in ComfyUI.
    """
    import torch

    sa, da = 1 - source_mask, 1 - destination_mask
    colour, alpha = PORTER_DUFF[mode](source * sa, sa, destination * da, da)
    straight = torch.where(alpha > 1e-5, colour / alpha, torch.zeros_like(colour)).clamp(0, 1)
    return straight, 1 - alpha


def _fitted(ctx, x, height: int, width: int, what: str):
    """``x`` [B, H, W, C] scaled to height x width (bicubic, centre-cropped), ComfyUI's rule here."""
    from nodes.resample import resize

    if tuple(x.shape[1:3]) == (height, width):
        return x
    ctx.message(f"{what} scaled from {x.shape[2]}x{x.shape[1]} to {width}x{height} (bicubic, centre crop)")
    return resize(x.movedim(-1, 1), width, height, "bicubic", "center").movedim(1, -1)


@define_node("PorterDuffImageComposite", category=COMPOSITING, display_name="Porter-Duff Image Composite",
             inputs=[Input("source", T.IMAGE), Input("source_alpha", T.MASK), Input("destination", T.IMAGE),
                     Input("destination_alpha", T.MASK),
                     Input("mode", T.COMBO, default="DST", choices=tuple(PORTER_DUFF))],
             outputs=[Output("IMAGE", T.IMAGE), Output("MASK", T.MASK)])
def porter_duff_image_composite(ctx, source, source_alpha, destination, destination_alpha, mode: str = "DST"):
    """Porter and Duff's compositing operators on two images with their alpha given as MASKs.

    As in ComfyUI: the batch is the shortest of the four inputs; the destination's mask, then
    the source, then the source's mask are scaled (bicubic, centre crop) to the destination's
    size; colours are premultiplied, combined, and divided back; the result's alpha is given
    back as a MASK (1 = transparent). Both images need the same number of channels.
    """
    import torch

    from nodes.masking import as_image, as_mask

    src, dst = as_image(source, "source"), as_image(destination, "destination")
    src_mask, dst_mask = as_mask(source_alpha, "source_alpha"), as_mask(destination_alpha, "destination_alpha")
    if mode not in PORTER_DUFF:
        raise NodeError(f"mode must be one of {', '.join(PORTER_DUFF)}", "mode")
    if src.shape[-1] != dst.shape[-1]:
        raise NodeError(f"source has {src.shape[-1]} channels but destination has {dst.shape[-1]}; "
                        f"both must have the same", "source")
    batch = min(src.shape[0], src_mask.shape[0], dst.shape[0], dst_mask.shape[0])
    if batch < max(src.shape[0], src_mask.shape[0], dst.shape[0], dst_mask.shape[0]):
        ctx.message(f"composited the first {batch} image(s): the shortest input has {batch}")
    height, width = int(dst.shape[1]), int(dst.shape[2])
    dst_m = _fitted(ctx, dst_mask[:batch].unsqueeze(-1), height, width, "destination_alpha")
    src_i = _fitted(ctx, src[:batch], height, width, "source")
    src_m = _fitted(ctx, src_mask[:batch].unsqueeze(-1), height, width, "source_alpha")
    image, mask = porter_duff(src_i.to(torch.float32), src_m, dst[:batch].to(torch.float32), dst_m, mode)
    return (image, mask.squeeze(-1))


# -- morphology -------------------------------------------------------------------------------

class FlatMorphology:
    """Grey morphology with a flat k x k square, kornia's window and border (see module docstring)."""

    def __init__(self, kernel_size: int) -> None:
        self.k = int(kernel_size)
        self.before = self.k // 2
        self.after = self.k - 1 - self.before

    def dilate(self, x):
        """The largest value in each pixel's window ([B, C, H, W])."""
        import torch.nn.functional as F

        padded = F.pad(x, (self.before, self.after, self.before, self.after), value=float("-inf"))
        rows = F.max_pool2d(padded, (self.k, 1), stride=1)  # separable: a square's max is rows' then columns'
        return F.max_pool2d(rows, (1, self.k), stride=1)

    def erode(self, x):
        """The smallest value in each pixel's window."""
        return -self.dilate(-x)

    def open(self, x):
        return self.dilate(self.erode(x))

    def close(self, x):
        return self.erode(self.dilate(x))

    def apply(self, operation: str, x):
        """One of ComfyUI's operations by name."""
        if operation == "erode":
            return self.erode(x)
        if operation == "dilate":
            return self.dilate(x)
        if operation == "open":
            return self.open(x)
        if operation == "close":
            return self.close(x)
        if operation == "gradient":
            return self.dilate(x) - self.erode(x)
        if operation == "top_hat":
            return x - self.open(x)
        if operation == "bottom_hat":
            return self.close(x) - x
        raise NodeError(f"operation must be one of {', '.join(MORPHOLOGY_OPERATIONS)}", "operation")


MORPHOLOGY_OPERATIONS = ("erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat")


@define_node("Morphology", category="image/postprocessing", display_name="ImageMorphology",
             inputs=[Input("image", T.IMAGE), Input("operation", T.COMBO, choices=MORPHOLOGY_OPERATIONS),
                     Input("kernel_size", T.INT, default=3, min=3, max=999, step=1)],
             outputs=[Output("IMAGE", T.IMAGE)])
def morphology(ctx, image, operation: str, kernel_size: int):
    """Erode (shrink bright areas), dilate (grow them), open, close, gradient (outlines), top hat
    (bright details smaller than the kernel) or bottom hat (dark ones), on every channel, with a
    square kernel; torch's max pooling in place of ComfyUI's kornia (see the module docstring)."""
    import torch

    from nodes.masking import as_image

    if int(kernel_size) < 1:
        raise NodeError("kernel_size must be at least 1", "kernel_size")
    x = as_image(image).to(torch.float32).movedim(-1, 1)
    return (FlatMorphology(kernel_size).apply(operation, x).movedim(1, -1).contiguous(),)


# -- YUV --------------------------------------------------------------------------------------

#: kornia's YCbCr constants: luma weights, and the chroma scales (Cb = (B - Y) * 0.564 + 0.5 ...)
#: with their inverses as kornia rounds them.
LUMA = (0.299, 0.587, 0.114)
CB_SCALE, CR_SCALE = 0.564, 0.713
R_FROM_CR, G_FROM_CR, G_FROM_CB, B_FROM_CB = 1.403, -0.714, -0.344, 1.773


def rgb_to_ycbcr(rgb):
    """[..., 3] RGB to [..., 3] YCbCr, full range, chroma centred on 0.5."""
    import torch

    r, g, b = rgb.unbind(-1)
    y = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    return torch.stack((y, (b - y) * CB_SCALE + 0.5, (r - y) * CR_SCALE + 0.5), dim=-1)


def ycbcr_to_rgb(ycbcr):
    """The inverse of :func:`rgb_to_ycbcr` (to kornia's rounding of the constants); not clamped."""
    import torch

    y, cb, cr = ycbcr.unbind(-1)
    cb, cr = cb - 0.5, cr - 0.5
    return torch.stack((y + R_FROM_CR * cr, y + G_FROM_CR * cr + G_FROM_CB * cb, y + B_FROM_CB * cb), dim=-1)


@define_node("ImageRGBToYUV", category="image/batch",
             inputs=[Input("image", T.IMAGE)],
             outputs=[Output("Y", T.IMAGE), Output("U", T.IMAGE), Output("V", T.IMAGE)])
def image_rgb_to_yuv(ctx, image):
    """The image's Y (luma), U (Cb) and V (Cr) channels, each as a grey RGB image; alpha is dropped."""
    import torch

    from nodes.masking import as_image

    image = as_image(image).to(torch.float32)
    if image.shape[-1] < 3:
        raise NodeError("the image has one channel; Y, U and V need red, green and blue", "image")
    ycbcr = rgb_to_ycbcr(image[..., :3])
    return tuple(ycbcr[..., i:i + 1].expand(*ycbcr.shape).contiguous() for i in range(3))


@define_node("ImageYUVToRGB", category="image/batch",
             inputs=[Input("Y", T.IMAGE), Input("U", T.IMAGE), Input("V", T.IMAGE)],
             outputs=[Output("IMAGE", T.IMAGE)])
def image_yuv_to_rgb(ctx, Y, U, V):  # noqa: N803 - ComfyUI's input names
    """An RGB image from Y, U and V images (each read as the mean of its channels, so ImageRGBToYUV's
    grey outputs or single-channel images both work); not clamped, as in ComfyUI."""
    import torch

    from nodes.masking import as_image

    planes = {name: as_image(value, name).to(torch.float32) for name, value in (("Y", Y), ("U", U), ("V", V))}
    shape = tuple(planes["Y"].shape[:3])
    for name in ("U", "V"):
        if tuple(planes[name].shape[:3]) != shape:
            raise NodeError(f"{name} is {tuple(planes[name].shape[:3])} (batch, height, width) but Y is {shape}; "
                            f"the three must match", name)
    ycbcr = torch.stack([p[..., :3].mean(dim=-1) for p in planes.values()], dim=-1)
    return (ycbcr_to_rgb(ycbcr),)
