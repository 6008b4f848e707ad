"""Latents with a frame axis, [B, C, frames, h, w]: Qwen-Image-Layered's layers (ComfyUI's layout).

Kiln's latents are images, [B, C, h, w]; Qwen-Image-Layered's are ComfyUI's video-shaped ones, one
frame per layer plus the composite first (``EmptyQwenImageLayeredLatentImage``: ``layers + 1`` frames).
Three small rules let them through the image pipeline without a second sampler:

* :func:`fold` stacks the frames down the height, [B, C, frames * h, w]: the same numbers in the same
  order, so the sampler's per-image noise (drawn at the latent's shape) is the noise drawn at the 5-D
  shape, and every step of every sampler is elementwise. :func:`unfold` undoes it; the frame count rides
  to the network on the conditioning (:data:`FRAMES`). :func:`fold_for_sampling` does both for every
  sampler node (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced), with the refusals,
  so they all sample a layered latent the same way.
* :func:`single_frames` lets VAEDecode take ``LatentCutToBatch``'s one-frame latents.
* ``LatentCut``/``LatentCutToBatch`` on ``t`` cut the frame axis, as ComfyUI's do.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.latent_ops import MAX_RESOLUTION

#: The conditioning key that carries a folded latent's frame count to the network.
FRAMES = "latent_frames"


def fold(samples: "Any") -> tuple["Any", int]:
    """[B, C, F, h, w] -> ([B, C, F * h, w], F); a 4-D latent passes with F = 0 (no frame axis)."""
    if samples.ndim != 5:
        return samples, 0
    b, c, f, h, w = samples.shape
    return samples.reshape(b, c, f * h, w), int(f)


def unfold(samples: "Any", frames: int) -> "Any":
    """:func:`fold`'s inverse (``frames`` 0: unchanged)."""
    if not frames:
        return samples
    b, c, fh, w = samples.shape
    return samples.reshape(b, c, frames, fh // frames, w)


def tag_frames(conditioning: list, frames: int) -> list:
    """The conditioning with each entry carrying ``frames`` (:data:`FRAMES`) for the network."""
    return [[t, {**extra, FRAMES: frames}] for t, extra in conditioning]


@dataclasses.dataclass(frozen=True, eq=False)
class Folded:
    """A sampler node's latent and conditionings as the image sampler takes them: ``latent`` the LATENT
    with its samples folded, the conditionings tagged with the frame count,
    ``frames`` 0 for an image latent (then everything is as given)."""

    latent: dict
    positive: Any
    negative: Any
    dual: Any
    frames: int

    def unfold(self, samples: "Any") -> "Any":
        """A sampled (folded) latent back in the input's layout."""
        return unfold(samples, self.frames)

    def sampling_config(self, config: dict) -> dict:
        """The model's scheduler config for this latent: with the frame count for a folded one, so a
        size-dependent shift is sized on one frame (nodes.samplers.flow.LATENT_FRAMES)."""
        from nodes.samplers.flow import LATENT_FRAMES

        return {**config, LATENT_FRAMES: self.frames} if self.frames else config

    def frame_height(self, samples: "Any") -> int:
        """The height of one frame of the (folded) ``samples``."""
        return int(samples.shape[2]) // max(self.frames, 1)


def fold_for_sampling(model: Any, latent: dict, positive: Any, negative: Any, dual: Any = None,
                      input_name: str = "latent_image") -> Folded:
    """Every sampler node's way in for a latent that may have a frame axis (see the module docstring).

    A family with ``layered_latents`` (Qwen-Image-Layered) takes only [B, C, frames, h, w], every other
    only [B, C, h, w]; a mismatch, or a noise mask on a layered latent (a mask is drawn for one picture,
    not per layer), is refused naming ``input_name``. ``dual`` is a guider's third conditioning holder
    (DualCFGGuider's, PerpNeg's: anything with a ``middle``), tagged like the other two. ``latent`` must
    be a LATENT whose samples are a tensor (the nodes check that first)."""
    samples = latent["samples"]
    family = model.family
    layered = bool(getattr(family, "layered_latents", False))
    if samples.ndim == 5 and not layered:
        raise NodeError(f"the latent has a frame axis {tuple(samples.shape)} [B, C, frames, h, w] (a layered "
                        f"latent, EmptyQwenImageLayeredLatentImage's, or a video's) but this {family.name} model "
                        "denoises images; load a Qwen-Image-Layered model or start from an image latent", input_name)
    if samples.ndim not in (4, 5) or (layered and samples.ndim != 5):
        maker = getattr(family, "frames_from", "EmptyQwenImageLayeredLatentImage")
        want = f"[B, C, frames, h, w] ({maker})" if layered else "[B, C, h, w]"
        raise NodeError(f"latent samples must be {want} for this {family.name} model, got shape "
                        f"{tuple(samples.shape)}", input_name)
    if not layered:
        return Folded(latent, positive, negative, dual, 0)
    if latent.get("noise_mask") is not None:
        raise NodeError("a noise mask on a layered latent is not supported: Qwen-Image-Layered decomposes the "
                        "whole picture (remove SetLatentNoiseMask)", input_name)
    folded, frames = fold(samples)
    out = dict(latent, samples=folded)  # (AddNoise takes image latents only: no noise to fold)
    if getattr(dual, "middle", None) is not None:
        dual = dataclasses.replace(dual, middle=tag_frames(dual.middle, frames))
    tag = lambda cond: None if cond is None else tag_frames(cond, frames)  # noqa: E731 (BasicGuider: no negative)
    return Folded(out, tag(positive), tag(negative), dual, frames)


def single_frames(latent: "Any", node: str, input_name: str = "samples") -> "Any":
    """A one-frame 5-D latent as the image latent it is; more frames are refused (VAEDecode decodes
    images: cut the layers into a batch first, as ComfyUI's Qwen-Image-Layered templates do)."""
    if latent.ndim != 5:
        return latent
    if latent.shape[2] != 1:
        raise NodeError(f"{node}: the latent has {latent.shape[2]} frames (layers) [B, C, frames, h, w]; "
                        "Kiln decodes images: split the frames into a batch first (LatentCutToBatch, dim t, "
                        "slice_size 1)", input_name)
    return latent[:, :, 0]


@define_node("EmptyQwenImageLayeredLatentImage", category="latent/qwen",
             display_name="Empty Qwen Image Layered Latent",
             inputs=[Input("width", T.INT, default=640, min=16, max=MAX_RESOLUTION, step=16),
                     Input("height", T.INT, default=640, min=16, max=MAX_RESOLUTION, step=16),
                     Input("layers", T.INT, default=3, min=0, max=MAX_RESOLUTION, step=1),
                     Input("batch_size", T.INT, default=1, min=1, max=4096)],
             outputs=[Output("LATENT", T.LATENT)])
def empty_qwen_image_layered_latent(ctx, width: int, height: int, layers: int, batch_size: int = 1):
    """Zeros [batch, 16, layers + 1, height / 8, width / 8]: the composite and ``layers`` layers, the
    frames Qwen-Image-Layered denoises (ComfyUI's node; the picture to decompose comes as a
    ReferenceLatent on the conditioning)."""
    import torch

    return ({"samples": torch.zeros(int(batch_size), 16, int(layers) + 1, int(height) // 8, int(width) // 8)},)


def axis_of(latent: "Any", dim: str, node: str, input_name: str = "dim") -> int:
    """ComfyUI's axis for x (width), y (height) or t (frames, which only a 5-D latent has)."""
    name = dim.lstrip("-")
    if name == "t":
        if latent.ndim != 5:
            raise NodeError(f"{node}: this latent is an image [batch, channels, height, width] with no time/layer "
                            "axis; use x or y (t cuts a layered latent's frames)", input_name)
        return 2
    if name not in ("x", "y"):
        raise NodeError(f"{node}: dim must be x, y or t", input_name)
    return latent.ndim - (1 if name == "x" else 2)


@define_node("LatentCutToBatch", category="latent/advanced",
             inputs=[Input("samples", T.LATENT), Input("dim", T.COMBO, choices=["t", "x", "y"]),
                     Input("slice_size", T.INT, default=1, min=1, max=MAX_RESOLUTION, step=1)],
             outputs=[Output("LATENT", T.LATENT)])
def latent_cut_to_batch(ctx, samples, dim: str, slice_size: int):
    """The latent cut into ``slice_size`` slices along ``dim``, the slices stacked into the batch in
    order (image 0's slices, then image 1's), as ComfyUI's node: a remainder that does not fill a
    slice is dropped, a slice larger than the axis takes the whole axis. With dim t it turns
    Qwen-Image-Layered's layers into a batch of one-frame latents that VAEDecode decodes."""
    import torch

    latent = samples.get("samples") if isinstance(samples, dict) else None
    if not isinstance(latent, torch.Tensor) or latent.ndim not in (4, 5):
        raise NodeError("LatentCutToBatch: samples must be a LATENT ([B, C, h, w] or [B, C, frames, h, w])",
                        "samples")
    axis = axis_of(latent, dim, "LatentCutToBatch")
    moved = latent.movedim(axis, 1)
    size = min(int(slice_size), moved.shape[1])
    moved = moved[:, :math.floor(moved.shape[1] / size) * size]
    out = {k: v for k, v in samples.items() if k not in ("noise_mask", "batch_index")}
    out["samples"] = moved.reshape(-1, size, *moved.shape[2:]).movedim(1, axis).contiguous()
    return (out,)
