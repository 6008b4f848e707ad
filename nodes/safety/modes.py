"""What happens to a flagged image: the one rule shared by the SafetyFilter node and the server's guard.

* ``flag``  the images pass unchanged; only the flags report.
* ``blur``  a flagged image is replaced by a strong Gaussian blur of itself, as
  Stability's API returns filtered results: colours and layout survive, detail
  does not (sigma is 1/12 of the long side, ~43 px at 512).
* ``black`` a flagged image becomes black, as diffusers' pipelines do.
* ``drop``  flagged images are removed from the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MODES = ("flag", "blur", "black", "drop")
#: Blur strength: sigma as a fraction of the image's long side.
BLUR_SIGMA_FRACTION = 1 / 12
#: The kernel reaches this many sigmas each side (scipy's default truncate is 4; 3 keeps 99.7 %).
BLUR_TRUNCATE = 3.0


@dataclass
class Filtered:
    """A batch after the mode: the images that go on, one flag per input image, and which were kept."""

    images: Any
    flags: list[bool]
    kept: list[int]

    @property
    def count(self) -> int:
        return sum(self.flags)


def check_mode(mode: Any) -> str:
    """The mode, or ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"unknown safety filter mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def gaussian_blur(images: "torch.Tensor", sigma: float) -> "torch.Tensor":
    """A separable Gaussian blur of IMAGE [B,H,W,C], edges extended (replicate)."""
    import torch
    import torch.nn.functional as F

    radius = max(1, int(BLUR_TRUNCATE * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(torch.float32)
    b, h, w, c = images.shape
    planes = images.to(torch.float32).permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return planes.reshape(b, c, h, w).permute(0, 2, 3, 1).clamp(0, 1).to(images.dtype).contiguous()


def blur_sigma(height: int, width: int) -> float:
    return max(1.0, max(height, width) * BLUR_SIGMA_FRACTION)


def apply_mode(images: "torch.Tensor", flags: list[bool], mode: str) -> Filtered:
    """The batch as ``mode`` leaves it; unflagged images are never touched."""
    check_mode(mode)
    if len(flags) != images.shape[0]:
        raise ValueError(f"{len(flags)} flags for {images.shape[0]} images")
    flagged = [i for i, f in enumerate(flags) if f]
    everyone = list(range(len(flags)))
    if mode == "flag" or not flagged:
        return Filtered(images, list(flags), everyone)
    if mode == "drop":
        kept = [i for i in everyone if not flags[i]]
        return Filtered(images[kept].contiguous(), list(flags), kept)
    out = images.clone()
    if mode == "black":
        out[flagged] = 0.0
        if out.shape[-1] == 4:  # keep black opaque rather than transparent
            out[flagged, ..., 3] = 1.0
    else:
        out[flagged] = gaussian_blur(images[flagged], blur_sigma(images.shape[1], images.shape[2]))
    return Filtered(out, list(flags), everyone)


def summary(result: Filtered, mode: str) -> str:
    """The node message: how many were flagged and what was done to them."""
    total = len(result.flags)
    done = {"flag": "passed on", "blur": "blurred", "black": "blacked out", "drop": "dropped"}[mode]
    if not result.count:
        return f"safety filter: none of {total} image(s) flagged"
    return f"safety filter: {result.count} of {total} image(s) flagged, {done}"

