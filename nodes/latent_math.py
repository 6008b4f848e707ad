"""ComfyUI's latent arithmetic, batching and geometry nodes, with its names, inputs and semantics:
LatentAdd, LatentSubtract, LatentMultiply, LatentInterpolate, LatentBatch,
LatentBatchSeedBehavior, LatentFlip, LatentRotate, LatentCrop, LatentConcat, LatentCut.

As in nodes.latent_ops, a latent that went through AddNoise is refused (its noise was drawn
for its shape and seeds), and ``batch_index`` (image i is seeded seed + batch_index[i]) is
carried as ComfyUI carries it. Where ComfyUI leaves a ``noise_mask`` behind when the
latent's geometry changes (flip, rotate, crop, batch, concat, cut), Kiln moves the mask with the
latent, so the repainted region stays where the picture is.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.latent_ops import CELL, MAX_RESOLUTION, _derived, plain_latent, sized_like

#: ComfyUI's flip and rotation choices (LatentFlip/ImageFlip, LatentRotate/ImageRotate): the
#: axis mirrored, and clockwise quarter turns.
FLIPS = {"x-axis: vertically": "height", "y-axis: horizontally": "width"}
ROTATIONS = {"none": 0, "90 degrees": 1, "180 degrees": 2, "270 degrees": 3}
_LATENT_AXES = {"height": 2, "width": 3}


def _pair(ctx, samples1, samples2):
    """Both latents, the second at the first's size (bilinear) and batch, as ComfyUI's latent math."""
    from nodes.masking import repeat_to_batch

    node = ctx.node_type
    a = plain_latent(samples1, "samples1", node)
    b = sized_like(ctx, a, plain_latent(samples2, "samples2", node), "samples2", "bilinear")
    return a, repeat_to_batch(b, a.shape[0])


_PAIR_INPUTS = [Input("samples1", T.LATENT), Input("samples2", T.LATENT)]


@define_node("LatentAdd", category="latent/advanced", inputs=_PAIR_INPUTS, outputs=[Output("LATENT", T.LATENT)])
def latent_add(ctx, samples1, samples2):
    """samples1 + samples2 (samples2 brought to samples1's shape); samples1's mask and seeds."""
    a, b = _pair(ctx, samples1, samples2)
    return (_derived(samples1, a + b),)


@define_node("LatentSubtract", category="latent/advanced", inputs=_PAIR_INPUTS,
             outputs=[Output("LATENT", T.LATENT)])
def latent_subtract(ctx, samples1, samples2):
    """samples1 - samples2 (samples2 brought to samples1's shape); samples1's mask and seeds."""
    a, b = _pair(ctx, samples1, samples2)
    return (_derived(samples1, a - b),)


@define_node("LatentMultiply", category="latent/advanced",
             inputs=[Input("samples", T.LATENT),
                     Input("multiplier", T.FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01)],
             outputs=[Output("LATENT", T.LATENT)])
def latent_multiply(ctx, samples, multiplier: float):
    return (_derived(samples, plain_latent(samples, "samples", "LatentMultiply") * float(multiplier)),)


@define_node("LatentInterpolate", category="latent/advanced",
             inputs=[*_PAIR_INPUTS, Input("ratio", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("LATENT", T.LATENT)])
def latent_interpolate(ctx, samples1, samples2, ratio: float):
    """Blend direction and length apart, cell by cell: the channel vectors are normalised, mixed
    ``ratio`` : ``1 - ratio`` and normalised again, then given the mixed length. A plain
    linear blend would shrink vectors pointing apart (washed-out results)."""
    import torch

    a, b = _pair(ctx, samples1, samples2)
    r = float(ratio)
    length_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    length_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    mixed = torch.nan_to_num(a / length_a) * r + torch.nan_to_num(b / length_b) * (1.0 - r)
    direction = torch.nan_to_num(mixed / torch.linalg.vector_norm(mixed, dim=1, keepdim=True))
    return (_derived(samples1, direction * (length_a * r + length_b * (1.0 - r))),)


def _batch_index(latent: dict, size: int) -> list[int]:
    return list(latent.get("batch_index", range(size)))


def _mask_or_ones(latent: dict, samples) -> Any:
    """The latent's noise mask at image size, one per image (all ones where it has none)."""
    import torch
    import torch.nn.functional as F

    from nodes.masking import repeat_to_batch

    size = (samples.shape[-2] * CELL, samples.shape[-1] * CELL)
    mask = latent.get("noise_mask")
    if mask is None:
        return torch.ones(samples.shape[0], 1, *size)
    mask = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    if tuple(mask.shape[-2:]) != size:
        mask = F.interpolate(mask, size=size, mode="bilinear")
    return repeat_to_batch(mask, samples.shape[0])


@define_node("LatentBatch", category="latent/batch", inputs=_PAIR_INPUTS, outputs=[Output("LATENT", T.LATENT)])
def latent_batch(ctx, samples1, samples2):
    """samples1's images followed by samples2's (scaled to samples1's size when it differs); each
    keeps its seed (batch_index), and a noise mask on either side covers its own images."""
    import torch

    a = plain_latent(samples1, "samples1", "LatentBatch")
    b = sized_like(ctx, a, plain_latent(samples2, "samples2", "LatentBatch"), "samples2", "bilinear")
    out = _derived(samples1, torch.cat([a, b]))
    out["batch_index"] = _batch_index(samples1, a.shape[0]) + _batch_index(samples2, b.shape[0])
    if "noise_mask" in samples1 or "noise_mask" in samples2:
        out["noise_mask"] = torch.cat([_mask_or_ones(samples1, a), _mask_or_ones(samples2, b)])
    return (out,)


@define_node("LatentBatchSeedBehavior", category="latent/advanced",
             inputs=[Input("samples", T.LATENT),
                     Input("seed_behavior", T.COMBO, default="fixed", choices=["random", "fixed"])],
             outputs=[Output("LATENT", T.LATENT)])
def latent_batch_seed_behavior(ctx, samples, seed_behavior: str):
    """``fixed``: every image gets the first image's seed (the same noise); ``random``: image i
    gets seed + i again (its batch_index dropped)."""
    latent = plain_latent(samples, "samples", "LatentBatchSeedBehavior")
    out = dict(samples)
    if seed_behavior == "random":
        out.pop("batch_index", None)
    elif seed_behavior == "fixed":
        out["batch_index"] = [_batch_index(samples, latent.shape[0])[0]] * latent.shape[0]
    else:
        raise NodeError("seed_behavior must be random or fixed", "seed_behavior")
    return (out,)


def _moved(samples: dict, latent, move) -> dict:
    """The latent and its noise mask (which lives at image size) through the same ``move``."""
    out = _derived(samples, move(latent))
    if samples.get("noise_mask") is not None:
        out["noise_mask"] = move(samples["noise_mask"])
    return out


@define_node("LatentFlip", category="latent/transform",
             inputs=[Input("samples", T.LATENT), Input("flip_method", T.COMBO, choices=list(FLIPS))],
             outputs=[Output("LATENT", T.LATENT)])
def latent_flip(ctx, samples, flip_method: str):
    """Mirror the latent: ``x-axis`` turns it upside down, ``y-axis`` left to right."""
    if flip_method not in FLIPS:
        raise NodeError(f"flip_method must be one of {', '.join(FLIPS)}", "flip_method")
    axis = _LATENT_AXES[FLIPS[flip_method]]
    return (_moved(samples, plain_latent(samples, "samples", "LatentFlip"), lambda x: x.flip(axis)),)


@define_node("LatentRotate", category="latent/transform",
             inputs=[Input("samples", T.LATENT), Input("rotation", T.COMBO, choices=list(ROTATIONS))],
             outputs=[Output("LATENT", T.LATENT)])
def latent_rotate(ctx, samples, rotation: str):
    """Turn the latent clockwise by quarter turns."""
    import torch

    if rotation not in ROTATIONS:
        raise NodeError(f"rotation must be one of {', '.join(ROTATIONS)}", "rotation")
    k = ROTATIONS[rotation]
    return (_moved(samples, plain_latent(samples, "samples", "LatentRotate"),
                   lambda x: torch.rot90(x, k=k, dims=[3, 2])),)


@define_node("LatentCrop", category="latent/transform",
             inputs=[Input("samples", T.LATENT),
                     Input("width", T.INT, default=512, min=64, max=MAX_RESOLUTION, step=8),
                     Input("height", T.INT, default=512, min=64, max=MAX_RESOLUTION, step=8),
                     Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
                     Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8)],
             outputs=[Output("LATENT", T.LATENT)])
def latent_crop(ctx, samples, width: int, height: int, x: int, y: int):
    """The width x height region at pixel (x, y), in whole latent cells (8 px); a start beyond
    the latent moves back so at least one cell remains, as ComfyUI's does."""
    latent = plain_latent(samples, "samples", "LatentCrop")
    h, w = latent.shape[-2:]
    left, top = min(int(x) // CELL, w - 1), min(int(y) // CELL, h - 1)
    right, bottom = min(left + max(int(width) // CELL, 1), w), min(top + max(int(height) // CELL, 1), h)

    def cut(t):
        scale_h, scale_w = t.shape[-2] // h, t.shape[-1] // w  # 1 for the latent, 8 for its mask
        return t[..., top * scale_h:bottom * scale_h, left * scale_w:right * scale_w].clone()

    return (_moved(samples, latent, cut),)


#: ComfyUI's LatentConcat/LatentCut axis names: x the width, y the height, t a video latent's time
#: (a leading minus on concat puts samples2 first). Kiln's latents are images [B, C, h, w], so "t"
#: is refused where ComfyUI would take the axis before the height, which there is the channels.
_AXES = {"x": 3, "y": 2}


def _axis(dim: str) -> int:
    name = dim.lstrip("-")
    if name == "t":
        raise NodeError("Kiln's latents are images [batch, channels, height, width] with no time axis; "
                        "use x or y", "dim")
    if name not in _AXES:
        raise NodeError("dim must be x or y (a leading - on LatentConcat puts samples2 first)", "dim")
    return _AXES[name]


@define_node("LatentConcat", category="latent/advanced",
             inputs=[*_PAIR_INPUTS, Input("dim", T.COMBO, choices=["x", "-x", "y", "-y", "t", "-t"])],
             outputs=[Output("LATENT", T.LATENT)])
def latent_concat(ctx, samples1, samples2, dim: str):
    """samples2 placed beside samples1: to its right (x), below it (y), or before it with a leading
    minus. samples2 is repeated or cut to samples1's batch, whose seeds (batch_index) the result
    keeps; the other side must match. A noise mask on either side is joined the same way (ones
    where a side has none), where ComfyUI keeps samples1's mask at its old size."""
    import torch

    from nodes.masking import repeat_to_batch

    axis = _axis(dim)
    a = plain_latent(samples1, "samples1", "LatentConcat")
    b = repeat_to_batch(plain_latent(samples2, "samples2", "LatentConcat"), a.shape[0]).to(a.dtype)
    other = 5 - axis  # the spatial axis that must agree
    if a.shape[1] != b.shape[1] or a.shape[other] != b.shape[other]:
        side = "height" if other == 2 else "width"
        raise NodeError(f"samples2 is {b.shape[1]} channels x {b.shape[2]}x{b.shape[3]} cells but samples1 is "
                        f"{a.shape[1]} x {a.shape[2]}x{a.shape[3]}: joining along {dim} needs the same channels "
                        f"and {side}", "samples2")
    out = _derived(samples1, torch.cat((b, a) if dim.startswith("-") else (a, b), dim=axis))
    if "noise_mask" in samples1 or "noise_mask" in samples2:
        masks = (_mask_or_ones(samples1, a), _mask_or_ones(samples2, b))
        out["noise_mask"] = torch.cat(masks[::-1] if dim.startswith("-") else masks, dim=axis)
    return (out,)


def cut_span(size: int, index: int, amount: int) -> tuple[int, int]:
    """(start, length) of LatentCut on an axis of ``size`` cells, clipped as ComfyUI clips it: a start
    past either end moves back onto the axis, and the length stops at the end (or, counting
    from the end, at the last cell)."""
    if index >= 0:
        start = min(index, size - 1)
        return start, min(size - start, amount)
    start = max(index, -size)
    return size + start, min(-start, amount)


@define_node("LatentCut", category="latent/advanced",
             inputs=[Input("samples", T.LATENT), Input("dim", T.COMBO, choices=["x", "y", "t"]),
                     Input("index", T.INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1),
                     Input("amount", T.INT, default=1, min=1, max=MAX_RESOLUTION, step=1)],
             outputs=[Output("LATENT", T.LATENT)])
def latent_cut(ctx, samples, dim: str, index: int, amount: int):
    """``amount`` latent cells along x (columns) or y (rows) from ``index`` (negative counts from
    the end); clipped to the latent, never empty. A noise mask is cut with it. On a layered latent
    [B, C, frames, h, w] (Qwen-Image-Layered's) t cuts frames (nodes.latent_layers)."""
    from nodes import latent_layers

    raw = samples.get("samples") if isinstance(samples, dict) else None
    if getattr(raw, "ndim", 0) == 5:
        axis = latent_layers.axis_of(raw, dim, "LatentCut")
        start, length = cut_span(int(raw.shape[axis]), int(index), max(int(amount), 1))
        out = {k: v for k, v in samples.items() if k != "noise_mask"}
        out["samples"] = raw.narrow(axis, start, length).clone()
        return (out,)
    axis = _axis(dim)
    latent = plain_latent(samples, "samples", "LatentCut")
    start, length = cut_span(int(latent.shape[axis]), int(index), max(int(amount), 1))
    out = _derived(samples, latent.narrow(axis, start, length).clone())
    if samples.get("noise_mask") is not None:
        out["noise_mask"] = _mask_or_ones(samples, latent).narrow(axis, start * CELL, length * CELL).clone()
    return (out,)
