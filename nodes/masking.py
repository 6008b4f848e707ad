"""Mask rules shared by the nodes that take a MASK (compositing now, inpainting later).

A MASK is float32 [B, H, W] in 0..1 where 1 marks the region to act on (to
repaint, to paste) — ComfyUI's convention, so LoadImage's alpha gives 1 where the
image is transparent. Nodes also accept a bare [H, W] mask, as ComfyUI does.

**Size rule** (:func:`fit_mask`), stated once: a mask whose size differs from
the image it applies to is

* resized (bilinear) when it is uniform — a constant mask has no geometry to
  distort, which covers LoadImage's 64x64 placeholder for images without alpha;
* resized (bilinear) when its aspect ratio is within 1% of the image's (the same
  mask drawn at another resolution), and the node says so;
* refused otherwise, with both sizes in the message: stretching a mask to another
  shape moves the region it marks, and cropping it silently would drop part of it.

An empty mask (nothing marked) is not an error for every node, but nodes that
would then do nothing say so (:func:`is_empty`).
"""
from __future__ import annotations

from typing import Any, Callable

from engine.context import NodeError

#: Largest relative difference of aspect ratios for a mask to be resized rather than refused.
ASPECT_TOLERANCE = 0.01


def as_mask(value: Any, input_name: str = "mask") -> Any:
    """``value`` as a float32 [B, H, W] tensor, or a NodeError naming the input."""
    import torch

    if not isinstance(value, torch.Tensor) or value.ndim not in (2, 3):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise NodeError(f"expected a MASK [batch, height, width], got {shape}", input_name)
    if value.ndim == 2:
        value = value.unsqueeze(0)
    if value.shape[-1] < 1 or value.shape[-2] < 1:
        raise NodeError(f"the mask is empty ({value.shape[-1]}x{value.shape[-2]} pixels)", input_name)
    return value.to(torch.float32)


def as_image(value: Any, input_name: str = "image") -> Any:
    """``value`` checked to be an IMAGE [B, H, W, C] with 1, 3 or 4 channels."""
    import torch

    if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[-1] not in (1, 3, 4):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise NodeError(f"expected an IMAGE [batch, height, width, channels], got {shape}", input_name)
    return value


def is_empty(mask: Any) -> bool:
    """True when no pixel of the mask is marked."""
    return float(mask.max()) <= 0.0


def repeat_to_batch(x: Any, batch: int) -> Any:
    """``x`` repeated along its first axis (and cut) to ``batch`` items, as ComfyUI batches inputs."""
    if x.shape[0] == batch:
        return x
    reps = -(-batch // x.shape[0])
    return x.repeat((reps,) + (1,) * (x.ndim - 1))[:batch]


def fit_mask(mask: Any, height: int, width: int, input_name: str = "mask",
             message: Callable[[str], None] | None = None, target: str = "the image") -> Any:
    """``mask`` [B, H, W] at height x width by the size rule in this module's docstring."""
    import torch.nn.functional as F

    mh, mw = int(mask.shape[-2]), int(mask.shape[-1])
    if (mh, mw) == (height, width):
        return mask
    uniform = float(mask.max()) == float(mask.min())
    if not uniform:
        want, have = width / height, mw / mh
        if abs(have - want) / want > ASPECT_TOLERANCE:
            raise NodeError(f"the mask is {mw}x{mh} but {target} is {width}x{height}: their shapes differ, so "
                            f"resizing would move the marked region; scale or crop the mask to {width}x{height} "
                            f"first", input_name)
    out = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
    if message is not None:
        message(f"mask resized from {mw}x{mh} to {width}x{height} (bilinear) to match {target}")
    return out.clamp(0.0, 1.0)


def composite(destination: Any, source: Any, x: int, y: int, mask: Any | None, multiplier: int,
              resize_source: bool, input_name: str = "mask", message: Callable[[str], None] | None = None) -> Any:
    """Paste ``source`` onto ``destination`` (both [B, C, H, W]) at pixel (x, y), through ``mask``.

    ``multiplier`` is the pixels per cell (8 for latents, 1 for images): x and y are
    in pixels and snap down to whole cells. ``resize_source`` first scales the source
    to the destination's size (bilinear). The part of the source that falls outside
    the destination is dropped; ``mask`` (1 = take the source) is fitted to the
    source's size by :func:`fit_mask`. Returns a new tensor.
    """
    import torch
    import torch.nn.functional as F

    out = destination.clone()
    if resize_source:
        source = F.interpolate(source, size=out.shape[-2:], mode="bilinear", align_corners=False)
    source = repeat_to_batch(source.to(out.dtype), out.shape[0])
    left, top = max(0, int(x)) // multiplier, max(0, int(y)) // multiplier
    vis_w, vis_h = min(source.shape[-1], out.shape[-1] - left), min(source.shape[-2], out.shape[-2] - top)
    if vis_w <= 0 or vis_h <= 0:
        if message is not None:
            message(f"the source lies outside the destination at ({x}, {y}): nothing is composited")
        return out
    if mask is None:
        weight = torch.ones((out.shape[0], 1, source.shape[-2], source.shape[-1]))
    else:
        fitted = fit_mask(as_mask(mask, input_name), source.shape[-2], source.shape[-1], input_name, message,
                          target="the source")
        if is_empty(fitted) and message is not None:
            message("the mask is empty: nothing is composited")
        weight = repeat_to_batch(fitted, out.shape[0]).unsqueeze(1)
    weight = weight[..., :vis_h, :vis_w].to(out.dtype)
    region = out[..., top:top + vis_h, left:left + vis_w]
    out[..., top:top + vis_h, left:left + vis_w] = weight * source[..., :vis_h, :vis_w] + (1 - weight) * region
    return out
