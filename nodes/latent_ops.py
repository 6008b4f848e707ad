"""Latent operations with ComfyUI's names, inputs and semantics.

LatentUpscale, LatentUpscaleBy, LatentComposite, LatentCompositeMasked,
LatentBlend, RepeatLatentBatch, LatentFromBatch. A LATENT is a dict with
``samples`` [B, C, h, w] (unscaled) and optional ``noise_mask`` and ``batch_index``,
which these nodes carry along as ComfyUI does (``batch_index`` keeps image i's seed
at seed + batch_index[i] after a batch is cut or repeated).

A latent that already went through AddNoise carries noise drawn for its exact
shape and seeds; resizing, repeating or mixing it would break the rule that image i
equals a single run with seed + i. These nodes therefore refuse such a latent and
say where AddNoise belongs (after them).
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.budget import Size
from engine.node import Input, Output, define_node
from nodes.resample import CROP_METHODS, LATENT_METHODS

MAX_RESOLUTION = 16384
#: How the budget reads an empty-latent node's size (engine.budget.Size).
EMPTY_LATENT_SIZE = Size(width="width", height="height", batch="batch_size")


def empty_latent_inputs(step: int, default: int = 1024, least: int = 16) -> list[Input]:
    """The inputs ComfyUI's empty-latent nodes share: width and height on the model's pixel grid
    (``step``), from ``least``, and batch_size."""
    return [Input("width", T.INT, default=default, min=least, max=MAX_RESOLUTION, step=step),
            Input("height", T.INT, default=default, min=least, max=MAX_RESOLUTION, step=step),
            Input("batch_size", T.INT, default=1, min=1, max=4096)]
#: Pixels per latent cell for SD-family VAEs.
CELL = 8


def plain_latent(value: Any, input_name: str, node: str) -> Any:
    """The LATENT's samples, after checking it is one and has not been through AddNoise."""
    import torch

    from nodes.sampling import _NOISE_KEYS

    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        raise NodeError("expected a LATENT (a dict with 'samples')", input_name)
    samples = value["samples"]
    if samples.ndim != 4:
        raise NodeError(f"latent samples must be [B, C, h, w], got shape {tuple(samples.shape)}", input_name)
    if any(k in value for k in _NOISE_KEYS):
        raise NodeError(f"this latent already has AddNoise's noise, drawn for its current size and batch; "
                        f"put {node} before AddNoise", input_name)
    return samples


def _derived(latent: dict, samples: Any) -> dict:
    out = dict(latent)
    out["samples"] = samples
    return out


def sized_like(ctx, first: Any, second: Any, input_name: str, method: str) -> Any:
    """``second`` at ``first``'s size (scaled with ``method``, centre crop, said in a message);
    the same channel count is required. ComfyUI's rule for nodes that combine two latents."""
    from nodes.resample import resize

    if first.shape[1] != second.shape[1]:
        raise NodeError(f"the latents have {first.shape[1]} and {second.shape[1]} channels", input_name)
    if first.shape[-2:] != second.shape[-2:]:
        ctx.message(f"{input_name} scaled from {second.shape[-1]}x{second.shape[-2]} to "
                    f"{first.shape[-1]}x{first.shape[-2]} cells ({method}, centre crop)")
        second = resize(second.float(), first.shape[-1], first.shape[-2], method, "center")
    return second.to(first.dtype)


def _upscaled(ctx, latent: dict, width_cells: int, height_cells: int, method: str, crop: str, input_name: str):
    from nodes.resample import check_pixel_budget, resize

    samples = plain_latent(latent, "samples", ctx.node_type)
    if method not in LATENT_METHODS:
        raise NodeError(f"upscale_method must be one of {', '.join(LATENT_METHODS)}", "upscale_method")
    check_pixel_budget(ctx.env, width_cells * CELL, height_cells * CELL, input_name, "the upscaled latent's image")
    resized = resize(samples.float(), width_cells, height_cells, method, crop)
    return (_derived(latent, resized),)


@define_node(
    "LatentUpscale",
    category="latent",
    display_name="Upscale Latent",
    inputs=[Input("samples", T.LATENT), Input("upscale_method", T.COMBO, choices=LATENT_METHODS),
            Input("width", T.INT, default=512, min=0, max=MAX_RESOLUTION, step=8,
                  tooltip="In pixels; 0 follows the height, keeping the aspect ratio"),
            Input("height", T.INT, default=512, min=0, max=MAX_RESOLUTION, step=8,
                  tooltip="In pixels; 0 follows the width, keeping the aspect ratio"),
            Input("crop", T.COMBO, choices=CROP_METHODS)],
    outputs=[Output("LATENT", T.LATENT)],
    size=Size(width="width", height="height"),
)
def latent_upscale(ctx, samples, upscale_method: str, width: int, height: int, crop: str):
    """Resize the latent to the size of a width x height image (each side at least 64 px, as in ComfyUI)."""
    latent = plain_latent(samples, "samples", "LatentUpscale")
    width, height = int(width), int(height)
    if width == 0 and height == 0:
        return (samples,)
    if width == 0:
        height = max(64, height)
        width = max(64, round(latent.shape[-1] * height / latent.shape[-2]))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(latent.shape[-2] * width / latent.shape[-1]))
    else:
        width, height = max(64, width), max(64, height)
    return _upscaled(ctx, samples, width // CELL, height // CELL, upscale_method, crop, "width")


@define_node(
    "LatentUpscaleBy",
    category="latent",
    display_name="Upscale Latent By",
    inputs=[Input("samples", T.LATENT), Input("upscale_method", T.COMBO, choices=LATENT_METHODS),
            Input("scale_by", T.FLOAT, default=1.5, min=0.01, max=8.0, step=0.01)],
    outputs=[Output("LATENT", T.LATENT)],
    size=Size(scale="scale_by"),
)
def latent_upscale_by(ctx, samples, upscale_method: str, scale_by: float):
    """Resize the latent by a factor (each side rounded to whole latent cells)."""
    latent = plain_latent(samples, "samples", "LatentUpscaleBy")
    width = max(1, round(latent.shape[-1] * float(scale_by)))
    height = max(1, round(latent.shape[-2] * float(scale_by)))
    return _upscaled(ctx, samples, width, height, upscale_method, "disabled", "scale_by")


def _edge_ramp(mask: Any, feather: int, top: bool, bottom: bool, left: bool, right: bool) -> Any:
    """Multiply the rows/columns within ``feather`` cells of the chosen edges by (t + 1) / feather."""
    for t in range(feather):
        w = (t + 1) / feather
        if top:
            mask[..., t, :] *= w
        if bottom:
            mask[..., mask.shape[-2] - 1 - t, :] *= w
        if left:
            mask[..., :, t] *= w
        if right:
            mask[..., :, mask.shape[-1] - 1 - t] *= w
    return mask


@define_node(
    "LatentComposite",
    category="latent",
    display_name="Latent Composite",
    inputs=[Input("samples_to", T.LATENT), Input("samples_from", T.LATENT),
            Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("feather", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8,
                  tooltip="Pixels over which the pasted latent fades in at edges inside the destination")],
    outputs=[Output("LATENT", T.LATENT)],
)
def latent_composite(ctx, samples_to, samples_from, x: int, y: int, feather: int):
    """Paste ``samples_from`` into ``samples_to`` at pixel (x, y) (snapped to 8), optionally feathered."""
    import torch

    from nodes.masking import repeat_to_batch

    dst = plain_latent(samples_to, "samples_to", "LatentComposite")
    src = plain_latent(samples_from, "samples_from", "LatentComposite")
    if src.shape[1] != dst.shape[1]:
        raise NodeError(f"the latents have {src.shape[1]} and {dst.shape[1]} channels", "samples_from")
    cx, cy, cf = int(x) // CELL, int(y) // CELL, int(feather) // CELL
    out = dst.clone()
    src = repeat_to_batch(src.to(out.dtype), out.shape[0])[..., :max(0, dst.shape[-2] - cy), :max(0, dst.shape[-1] - cx)]
    if src.shape[-1] == 0 or src.shape[-2] == 0:
        ctx.message(f"samples_from lies outside samples_to at ({x}, {y}): nothing is composited")
        return (_derived(samples_to, out),)
    h, w = src.shape[-2:]
    mask = torch.ones_like(src)
    if cf > 0:
        mask = _edge_ramp(mask, cf, top=cy != 0, bottom=cy + h < dst.shape[-2], left=cx != 0,
                          right=cx + w < dst.shape[-1])
    region = out[..., cy:cy + h, cx:cx + w]
    out[..., cy:cy + h, cx:cx + w] = src * mask + region * (1 - mask)
    return (_derived(samples_to, out),)


@define_node(
    "LatentCompositeMasked",
    category="latent",
    display_name="Latent Composite Masked",
    inputs=[Input("destination", T.LATENT), Input("source", T.LATENT),
            Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("resize_source", T.BOOLEAN, default=False),
            Input("mask", T.MASK, optional=True, tooltip="1 = take the source; fitted to the source's latent size")],
    outputs=[Output("LATENT", T.LATENT)],
)
def latent_composite_masked(ctx, destination, source, x: int, y: int, resize_source: bool = False, mask=None):
    """Paste ``source`` into ``destination`` at pixel (x, y) (snapped to 8), through ``mask`` when given.

    The mask (usually drawn at pixel size) is fitted to the source's latent size by
    the mask size rule in ``nodes/masking.py``: same aspect ratio, resized bilinearly.
    """
    from nodes.masking import composite

    dst = plain_latent(destination, "destination", "LatentCompositeMasked")
    src = plain_latent(source, "source", "LatentCompositeMasked")
    if src.shape[1] != dst.shape[1]:
        raise NodeError(f"the latents have {src.shape[1]} and {dst.shape[1]} channels", "source")
    out = composite(dst, src, x, y, mask, CELL, bool(resize_source), message=ctx.message)
    return (_derived(destination, out),)


@define_node(
    "LatentBlend",
    category="latent",
    display_name="Latent Blend",
    inputs=[Input("samples1", T.LATENT), Input("samples2", T.LATENT),
            Input("blend_factor", T.FLOAT, default=0.5, min=0.0, max=1.0, step=0.01,
                  tooltip="Weight of samples1")],
    outputs=[Output("LATENT", T.LATENT)],
)
def latent_blend(ctx, samples1, samples2, blend_factor: float):
    """samples1 * factor + samples2 * (1 - factor); samples2 of another size is first scaled (bicubic, centre crop)."""
    from nodes.masking import repeat_to_batch

    a = plain_latent(samples1, "samples1", "LatentBlend")
    b = repeat_to_batch(sized_like(ctx, a, plain_latent(samples2, "samples2", "LatentBlend"), "samples2", "bicubic"),
                        a.shape[0])
    factor = float(blend_factor)
    return (_derived(samples1, a * factor + b * (1 - factor)),)


@define_node(
    "RepeatLatentBatch",
    category="latent/batch",
    display_name="Repeat Latent Batch",
    inputs=[Input("samples", T.LATENT), Input("amount", T.INT, default=1, min=1, max=64)],
    outputs=[Output("LATENT", T.LATENT)],
    size=Size(repeat="amount"),
)
def repeat_latent_batch(ctx, samples, amount: int):
    """The batch repeated ``amount`` times: with AddNoise after it, image i is seeded seed + i.

    A batch_index (from LatentFromBatch) is continued past its largest value, so
    the copies get seeds of their own too.
    """
    latent = plain_latent(samples, "samples", "RepeatLatentBatch")
    amount = int(amount)
    if amount == 1:
        return (samples,)  # nothing to repeat: the very same latent, so results stay bit-identical
    out = _derived(samples, latent.repeat((amount, 1, 1, 1)))
    mask = samples.get("noise_mask")
    if mask is not None and mask.shape[0] > 1:
        out["noise_mask"] = mask.repeat((amount,) + (1,) * (mask.ndim - 1))
    if "batch_index" in samples:
        index = list(samples["batch_index"])
        offset = max(index) - min(index) + 1
        out["batch_index"] = index + [k + i * offset for i in range(1, amount) for k in index]
    return (out,)


@define_node(
    "LatentFromBatch",
    category="latent/batch",
    display_name="Get Latent From Batch",
    inputs=[Input("samples", T.LATENT),
            Input("batch_index", T.INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION,
                  tooltip="First latent to take (negative: from the end)"),
            Input("length", T.INT, default=1, min=1, max=64)],
    outputs=[Output("LATENT", T.LATENT)],
)
def latent_from_batch(ctx, samples, batch_index: int, length: int):
    """``length`` latents from ``batch_index``; they keep their seeds (seed + their index in the batch)."""
    from nodes.image_ops import batch_slice

    latent = plain_latent(samples, "samples", "LatentFromBatch")
    start, count = batch_slice(latent.shape[0], int(batch_index), int(length))
    out = _derived(samples, latent[start:start + count].clone())
    mask = samples.get("noise_mask")
    if mask is not None:
        if mask.shape[0] == 1:
            out["noise_mask"] = mask.clone()
        else:
            if mask.shape[0] < latent.shape[0]:
                from nodes.masking import repeat_to_batch

                mask = repeat_to_batch(mask, latent.shape[0])
            out["noise_mask"] = mask[start:start + count].clone()
    if "batch_index" in samples:
        out["batch_index"] = list(samples["batch_index"])[start:start + count]
    else:
        out["batch_index"] = list(range(start, start + count))
    return (out,)
