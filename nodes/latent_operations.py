"""ComfyUI's latent operations: LatentOperationSharpen and LatentOperationTonemapReinhard make a
LATENT_OPERATION, a function from latent to latent; LatentApplyOperation runs one on a LATENT,
LatentApplyOperationCFG (nodes.guidance_patches) on the guidance difference at every step.

Both operations split each latent cell into its channel vector's length and direction:

* Sharpen convolves the directions with an unsharp kernel (a Gaussian over [-1, 1] across
  the kernel, times -10 alpha, its centre raised so it sums to 1, as ImageSharpen's) and puts
  the lengths back, so detail is sharpened without changing how strong each cell is.
* Tonemap (Reinhard) leaves the directions and compresses the lengths m to m / (1 + m / top),
  with top = multiplier * (mean + 5 std) of the image's lengths: the strongest cells are
  tamed, the weak ones nearly untouched.

Where Kiln differs from ComfyUI: ComfyUI mirrors a latent's edges for the sharpen kernel and
fails on a latent not larger than the radius (a 72-pixel-or-smaller image at the default
radius 9); Kiln clamps the edges there instead. At tonemap multiplier 0 ComfyUI divides by
zero (NaN latents); Kiln gives the limit, m * top / (m + top) = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.image_filters import gaussian_kernel

CATEGORY = "latent/advanced/operations"


def _lengths(latent: "Any", floor: float) -> "Any":
    """Each cell's channel-vector length (plus ``floor``, so a zero cell divides safely), [B, 1, h, w]."""
    import torch

    return torch.linalg.vector_norm(latent, dim=1, keepdim=True) + floor


@dataclass(frozen=True)
class Sharpen:
    """LatentOperationSharpen's operation (see the module docstring)."""

    radius: int = 9
    sigma: float = 1.0
    alpha: float = 0.1

    def changes_nothing(self) -> bool:
        """At alpha 0 the kernel is a single 1: the latent comes back as it was."""
        return self.alpha == 0.0

    def __call__(self, latent: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self.changes_nothing():
            return latent
        size = 2 * self.radius + 1
        kernel = gaussian_kernel(size, self.sigma) * (-10.0 * self.alpha)
        kernel[size // 2, size // 2] += 1.0 - kernel.sum()
        x = latent.float()
        lengths = _lengths(x, 1e-6)
        mode = "reflect" if min(x.shape[-2:]) > self.radius else "replicate"
        padded = F.pad(x / lengths, (self.radius,) * 4, mode=mode)
        channels = x.shape[1]
        weights = kernel.to(x.device).expand(channels, 1, size, size)
        sharpened = F.conv2d(padded, weights, groups=channels)
        return (lengths * sharpened).to(latent.dtype)


@dataclass(frozen=True)
class TonemapReinhard:
    """LatentOperationTonemapReinhard's operation (see the module docstring)."""

    multiplier: float = 1.0

    def changes_nothing(self) -> bool:
        return False  # no multiplier leaves every length as it is

    def __call__(self, latent: Any) -> Any:
        import torch

        x = latent.float()
        lengths = _lengths(x, 1e-10)
        mean = lengths.mean(dim=(1, 2, 3), keepdim=True)
        spread = lengths.std(dim=(1, 2, 3), keepdim=True)
        top = (mean + 5.0 * spread) * self.multiplier
        compressed = lengths * top / (lengths + top)
        return (x / lengths * compressed).to(latent.dtype)


def _number(name: str, value: Any, low: float, high: float, kind: type = float) -> Any:
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise NodeError(f"{name} must be a number, got {value!r}", name) from None
    if not low <= value <= high:
        raise NodeError(f"{name} must be between {low:g} and {high:g}, got {value:g}", name)
    return value


def check_operation(operation: Any, input_name: str = "operation") -> Any:
    """``operation`` if it is a LATENT_OPERATION; a NodeError naming the input otherwise."""
    if not (callable(operation) and callable(getattr(operation, "changes_nothing", None))):
        raise NodeError(f"expected a LATENT_OPERATION, got {type(operation).__name__}", input_name)
    return operation


@define_node("LatentOperationSharpen", category=CATEGORY,
             inputs=[Input("sharpen_radius", T.INT, default=9, min=1, max=31, step=1),
                     Input("sigma", T.FLOAT, default=1.0, min=0.1, max=10.0, step=0.1),
                     Input("alpha", T.FLOAT, default=0.1, min=0.0, max=5.0, step=0.01)],
             outputs=[Output("LATENT_OPERATION", T.LATENT_OPERATION)])
def latent_operation_sharpen(ctx, sharpen_radius: int, sigma: float, alpha: float):
    """Sharpens the latent's detail while keeping each cell's strength (0 alpha: unchanged)."""
    return (Sharpen(_number("sharpen_radius", sharpen_radius, 1, 31, int), _number("sigma", sigma, 0.1, 10.0),
                    _number("alpha", alpha, 0.0, 5.0)),)


@define_node("LatentOperationTonemapReinhard", category=CATEGORY,
             inputs=[Input("multiplier", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("LATENT_OPERATION", T.LATENT_OPERATION)])
def latent_operation_tonemap_reinhard(ctx, multiplier: float):
    """Compresses the strongest latent cells (Reinhard's tone curve on the channel lengths);
    applied to guidance (LatentApplyOperationCFG) it tames a high cfg's burn."""
    return (TonemapReinhard(_number("multiplier", multiplier, 0.0, 100.0)),)


@define_node("LatentApplyOperation", category=CATEGORY,
             inputs=[Input("samples", T.LATENT), Input("operation", T.LATENT_OPERATION)],
             outputs=[Output("LATENT", T.LATENT)])
def latent_apply_operation(ctx, samples, operation):
    """The operation on the latent's samples; the other keys (mask, seeds) kept."""
    import torch

    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise NodeError("expected a LATENT (a dict with 'samples')", "samples")
    if samples["samples"].ndim != 4:
        raise NodeError(f"latent samples must be [B, C, h, w], got shape {tuple(samples['samples'].shape)}", "samples")
    out = dict(samples)
    out["samples"] = check_operation(operation)(samples["samples"])
    return (out,)
