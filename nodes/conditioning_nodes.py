"""The Conditioning* nodes, with ComfyUI's names, inputs and outputs.

They only edit CONDITIONING values (lists of ``[embeds, extras]``): join lists,
join or blend token sequences, or set where and when an entry applies (``area``,
``strength``, ``mask``, ``start_percent``/``end_percent``). What those keys do
during sampling is nodes.families.conditioning's business, the one place that rule
lives. Every node returns new lists and dicts: the inputs, which the cache may
hold for other nodes, are never changed.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

MAX_RESOLUTION = 16384
COND = [Output("CONDITIONING", T.CONDITIONING)]


def _entries(cond: Any, name: str) -> list[list]:
    """Checked copies ``[embeds, dict(extras)]`` of a CONDITIONING input."""
    if not isinstance(cond, (list, tuple)) or not cond:
        raise NodeError("is not CONDITIONING (a non-empty list of [embeds, {...}])", input_name=name)
    out = []
    for item in cond:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict)
        if not ok or getattr(item[0], "ndim", None) != 3:
            raise NodeError("is not CONDITIONING (each entry is [embeds [1, tokens, dim], {...}])", input_name=name)
        out.append([item[0], dict(item[1])])
    return out


def with_options(conditioning: Any, input_name: str = "conditioning", **values: Any) -> list[list]:
    """A copy of ``conditioning`` whose every entry carries ``values`` (ComfyUI's option keys: area,
    strength, mask, guidance, ...); the input's entries stay as they were (the cache holds them)."""
    out = _entries(conditioning, input_name)
    for entry in out:
        entry[1].update(values)
    return out


def _first(ctx: Any, cond: Any, name: str) -> list:
    entries = _entries(cond, name)
    if len(entries) > 1:
        ctx.message(f"{name} has {len(entries)} entries; only the first is used (as in ComfyUI)")
    return entries[0]


def _same_width(a: Any, b: Any, name: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise NodeError(f"its embeddings are {b.shape[-1]} wide but conditioning_to's are {a.shape[-1]}: "
                        "they come from different text encoders", input_name=name)


@define_node("ConditioningCombine", category="conditioning", display_name="Conditioning (Combine)",
             inputs=[Input("conditioning_1", T.CONDITIONING), Input("conditioning_2", T.CONDITIONING)], outputs=COND)
def conditioning_combine(ctx, conditioning_1: Any, conditioning_2: Any):
    """Both conditionings' entries in one list: the sampler evaluates each and averages the
    predictions by weight (with areas: each where it applies)."""
    return (_entries(conditioning_1, "conditioning_1") + _entries(conditioning_2, "conditioning_2"),)


@define_node("ConditioningConcat", category="conditioning", display_name="Conditioning (Concat)",
             inputs=[Input("conditioning_to", T.CONDITIONING), Input("conditioning_from", T.CONDITIONING)],
             outputs=COND)
def conditioning_concat(ctx, conditioning_to: Any, conditioning_from: Any):
    """Append conditioning_from's tokens to each entry of conditioning_to (one longer prompt
    whose parts were encoded separately, so they do not attend to each other in CLIP)."""
    import torch

    source = _first(ctx, conditioning_from, "conditioning_from")[0]
    out = []
    for embeds, extra in _entries(conditioning_to, "conditioning_to"):
        _same_width(embeds, source, "conditioning_from")
        out.append([torch.cat([embeds, source.to(embeds.dtype)], dim=1), extra])
    return (out,)


@define_node("ConditioningAverage", category="conditioning", display_name="Conditioning (Average)",
             inputs=[Input("conditioning_to", T.CONDITIONING), Input("conditioning_from", T.CONDITIONING),
                     Input("conditioning_to_strength", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=COND)
def conditioning_average(ctx, conditioning_to: Any, conditioning_from: Any, conditioning_to_strength: float):
    """``to * s + from * (1 - s)`` per token (and pooled output); conditioning_from is cut or
    zero-padded to each entry's token count, as ComfyUI does."""
    import torch

    s = float(conditioning_to_strength)
    source, source_extra = _first(ctx, conditioning_from, "conditioning_from")
    pooled_from = source_extra.get("pooled_output")
    out = []
    for embeds, extra in _entries(conditioning_to, "conditioning_to"):
        _same_width(embeds, source, "conditioning_from")
        other = source[:, :embeds.shape[1]].to(embeds.dtype)
        if other.shape[1] < embeds.shape[1]:
            pad = torch.zeros(1, embeds.shape[1] - other.shape[1], embeds.shape[2], dtype=embeds.dtype)
            other = torch.cat([other, pad], dim=1)
        pooled_to = extra.get("pooled_output", pooled_from)
        if pooled_from is not None and pooled_to is not None:
            extra["pooled_output"] = pooled_to * s + pooled_from * (1.0 - s)
        elif pooled_from is not None:
            extra["pooled_output"] = pooled_from
        out.append([embeds * s + other * (1.0 - s), extra])
    return (out,)


@define_node("ConditioningZeroOut", category="advanced/conditioning", display_name="ConditioningZeroOut",
             inputs=[Input("conditioning", T.CONDITIONING)], outputs=COND)
def conditioning_zero_out(ctx, conditioning: Any):
    """Zeros in place of the embeddings and the pooled output (SDXL's 'no negative prompt')."""
    import torch

    out = []
    for embeds, extra in _entries(conditioning, "conditioning"):
        if extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(embeds), extra])
    return (out,)


def _strength() -> Input:
    return Input("strength", T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.01)


@define_node("ConditioningSetArea", category="conditioning", display_name="Conditioning (Set Area)",
             inputs=[Input("conditioning", T.CONDITIONING),
                     Input("width", T.INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
                     Input("height", T.INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
                     Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
                     Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
                     _strength()],
             outputs=COND)
def conditioning_set_area(ctx, conditioning: Any, width: int, height: int, x: int, y: int, strength: float):
    """Apply the prompt only inside a rectangle, in image pixels (rounded down to the latent's
    8-pixel grid); combine it with a prompt for the whole image."""
    return (with_options(conditioning, area=(int(height) // 8, int(width) // 8, int(y) // 8, int(x) // 8),
                 strength=float(strength), set_area_to_bounds=False),)


@define_node("ConditioningSetAreaPercentage", category="conditioning",
             display_name="Conditioning (Set Area with Percentage)",
             inputs=[Input("conditioning", T.CONDITIONING),
                     Input("width", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
                     Input("height", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
                     Input("x", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.01),
                     Input("y", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.01),
                     _strength()],
             outputs=COND)
def conditioning_set_area_percentage(ctx, conditioning: Any, width: float, height: float, x: float, y: float,
                                     strength: float):
    """Apply the prompt only inside a rectangle given as fractions of the image (any size)."""
    return (with_options(conditioning, area=("percentage", float(height), float(width), float(y), float(x)),
                 strength=float(strength), set_area_to_bounds=False),)


@define_node("ConditioningSetAreaStrength", category="conditioning", display_name="ConditioningSetAreaStrength",
             inputs=[Input("conditioning", T.CONDITIONING), _strength()], outputs=COND)
def conditioning_set_area_strength(ctx, conditioning: Any, strength: float):
    """How much this entry counts where it overlaps others (its weight in the average)."""
    return (with_options(conditioning, strength=float(strength)),)


@define_node("ConditioningSetMask", category="conditioning", display_name="Conditioning (Set Mask)",
             inputs=[Input("conditioning", T.CONDITIONING), Input("mask", T.MASK), _strength(),
                     Input("set_cond_area", T.COMBO, choices=["default", "mask bounds"], default="default")],
             outputs=COND)
def conditioning_set_mask(ctx, conditioning: Any, mask: Any, strength: float, set_cond_area: str = "default"):
    """Weight the prompt by a mask (resized to the latent). 'mask bounds' also evaluates it only
    on the mask's bounding box, at that box's own framing."""
    import torch

    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise NodeError("must be a MASK tensor [B, H, W]", input_name="mask")
    if set_cond_area not in ("default", "mask bounds"):
        raise NodeError(f"must be 'default' or 'mask bounds', got {set_cond_area!r}", input_name="set_cond_area")
    m = mask.unsqueeze(0) if mask.ndim == 2 else mask
    return (with_options(conditioning, mask=m.to(torch.float32), set_area_to_bounds=set_cond_area != "default",
                 mask_strength=float(strength)),)


@define_node("ConditioningSetTimestepRange", category="advanced/conditioning",
             display_name="ConditioningSetTimestepRange",
             inputs=[Input("conditioning", T.CONDITIONING),
                     Input("start", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
                     Input("end", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.001)],
             outputs=COND)
def conditioning_set_timestep_range(ctx, conditioning: Any, start: float, end: float):
    """Use the prompt only for part of sampling: 0 is the noisiest start of the model's
    schedule, 1 the end (e.g. combine prompt A on 0-0.5 with prompt B on 0.5-1)."""
    if float(start) > float(end):
        ctx.message(f"start {start} is after end {end}: this conditioning never applies")
    return (with_options(conditioning, start_percent=float(start), end_percent=float(end)),)
