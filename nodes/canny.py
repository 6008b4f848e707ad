"""Canny: the edge map most ControlNets are trained on, with ComfyUI's node and thresholds.

The steps are the classic detector's as kornia (which ComfyUI calls) runs them, in
plain torch so no image library is added: luma grey, a 5x5 Gaussian blur (sigma 1,
reflected borders), unnormalised 3x3 Sobel gradients (replicated borders), the
magnitude thinned by non-maximum suppression along the gradient rounded to 45
degrees, then hysteresis: pixels above ``high_threshold`` are edges, and pixels above
``low_threshold`` joined to an edge through 8-neighbours become edges too. The
thresholds are on the gradient magnitude of a 0..1 image (a sharp black-to-white
step peaks near 2.6 after the blur). One difference from kornia on purpose: a
pixel survives suppression when it is >= its neighbour on one side and > on the
other, so a plateau two pixels wide (an edge exactly between pixels) keeps one
line instead of losing both.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

if TYPE_CHECKING:
    import torch

#: (dy, dx) of the neighbour in each 45-degree direction 0..3 (gradient angle / 45, mod 4).
_STEPS = ((0, 1), (1, 1), (1, 0), (1, -1))


def _gaussian(x: "torch.Tensor", size: int = 5, sigma: float = 1.0) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    r = size // 2
    g = torch.exp(-(torch.arange(size, dtype=x.dtype) - r) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.device)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, size))
    return F.conv2d(x, g.view(1, 1, size, 1))


def _shift(x: "torch.Tensor", dy: int, dx: int) -> "torch.Tensor":
    """x moved so that out[y, x] = in[y + dy, x + dx] (zeros outside)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def canny(image: "torch.Tensor", low: float, high: float) -> "torch.Tensor":
    """Edges (0 or 1) [B, 1, H, W] of ``image`` [B, C, H, W] in 0..1."""
    import torch
    import torch.nn.functional as F

    x = image.to(torch.float32)
    if x.shape[1] >= 3:
        x = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    else:
        x = x[:, :1]
    if min(x.shape[-2:]) >= 3:
        x = _gaussian(x)
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    gx = F.conv2d(p, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(p, sobel.t().contiguous().view(1, 1, 3, 3))
    mag = torch.sqrt(gx * gx + gy * gy)
    direction = torch.round(torch.atan2(gy, gx) * (4 / math.pi)).long() % 4
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for d, (dy, dx) in enumerate(_STEPS):
        ahead, behind = _shift(mag, dy, dx), _shift(mag, -dy, -dx)
        keep |= (direction == d) & (mag >= ahead) & (mag > behind)
    thin = torch.where(keep, mag, torch.zeros_like(mag))
    strong = thin > high
    weak = thin > low
    while True:  # hysteresis: grow the strong edges through weak pixels until nothing changes
        grown = weak & (F.max_pool2d(strong.float(), 3, stride=1, padding=1) > 0)
        grown |= strong
        if torch.equal(grown, strong):
            return strong.float()
        strong = grown


@define_node(
    "Canny",
    category="image/preprocessors",
    inputs=[Input("image", T.IMAGE),
            Input("low_threshold", T.FLOAT, default=0.4, min=0.01, max=0.99, step=0.01,
                  tooltip="Gradient strength that continues an edge"),
            Input("high_threshold", T.FLOAT, default=0.8, min=0.01, max=0.99, step=0.01,
                  tooltip="Gradient strength that starts an edge")],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def canny_node(ctx, image, low_threshold: float, high_threshold: float):
    """White edges on black, as a ControlNet hint (the Canny ControlNets' input)."""
    import torch

    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise NodeError("image must be an IMAGE [B, H, W, C]", "image")
    if float(low_threshold) > float(high_threshold):
        raise NodeError(f"low_threshold ({low_threshold}) is above high_threshold ({high_threshold})",
                        "low_threshold")
    edges = canny(image.movedim(-1, 1), float(low_threshold), float(high_threshold))
    return (edges.repeat(1, 3, 1, 1).movedim(1, -1).contiguous(),)
