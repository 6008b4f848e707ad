"""How several conditionings on one side of guidance combine, as ComfyUI defines it.

A CONDITIONING is a list of ``[embeds, extras]`` entries. Each entry is evaluated
on its region of the latent (``area``: ``(h, w, y, x)`` in latent pixels, or
``("percentage", h, w, y, x)``), weighted by ``strength`` and by an optional
``mask`` (times ``mask_strength``), and counted only while the noise level is
inside its timestep range (``start_percent`` .. ``end_percent`` of the schedule,
0 = the noisiest end). The side's output is the weighted sum of the entries'
outputs divided by the summed weights, so overlapping prompts blend and a region
no entry covers gets no prediction. An area without a mask fades in over 8 latent
pixels at each edge that is not the latent's border, so areas blend seamlessly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodes.families.base import ConditioningError

if TYPE_CHECKING:
    import torch

#: Keys that make an entry need the general path (anything else rides along in extras).
REGIONAL_KEYS = ("area", "mask", "start_percent", "end_percent", "strength")
FEATHER = 8


@dataclass
class Entry:
    embeds: "torch.Tensor"
    extra: dict


def entries(cond: Any, name: str) -> list[Entry]:
    """The entries of a CONDITIONING input, checked; errors name the input."""
    import torch

    if not isinstance(cond, (list, tuple)) or not cond:
        raise ConditioningError(f"{name} is not CONDITIONING ([[embeds, {{...}}], ...])", name)
    out = []
    for item in cond:
        try:
            embeds, extra = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            raise ConditioningError(f"{name} is not CONDITIONING ([[embeds, {{...}}], ...])", name) from None
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            raise ConditioningError(f"{name} embeds must be a [1, tokens, dim] tensor", name)
        out.append(Entry(embeds, {**dict(extra or {}), "_input": name}))
    return out


def is_plain(side: list[Entry]) -> bool:
    """One entry over the whole latent at full strength for every step."""
    if len(side) != 1:
        return False
    extra = side[0].extra
    return all(k not in extra for k in REGIONAL_KEYS if k != "strength") and float(extra.get("strength", 1.0)) == 1.0


def match_tokens(a: "torch.Tensor", b: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Equal token counts for two prompts that share a batch.

    Long prompts are encoded in 77-token chunks, so two prompts of different
    lengths are repeated up to their least common multiple, as ComfyUI does.
    """
    import math

    ta, tb = a.shape[1], b.shape[1]
    if ta == tb:
        return a, b
    n = math.lcm(ta, tb)
    return a.repeat(1, n // ta, 1), b.repeat(1, n // tb, 1)


def sigma_range(extra: dict, sigma_at_percent: Any) -> tuple[float, float]:
    """(highest, lowest) noise level at which the entry counts."""
    start, end = float(extra.get("start_percent", 0.0)), float(extra.get("end_percent", 1.0))
    return sigma_at_percent(start), sigma_at_percent(end)


def area_of(extra: dict, h: int, w: int) -> tuple[int, int, int, int]:
    """(height, width, y, x) of the entry's region in latent pixels, clipped to the latent."""
    area = extra.get("area")
    if area is None:
        return h, w, 0, 0
    if area[0] == "percentage":
        ah, aw, ay, ax = (float(v) for v in area[1:5])
        ah, aw, ay, ax = max(1, round(ah * h)), max(1, round(aw * w)), round(ay * h), round(ax * w)
    else:
        ah, aw, ay, ax = (int(v) for v in area[:4])
    ay, ax = min(max(ay, 0), h - 1), min(max(ax, 0), w - 1)
    return max(1, min(ah, h - ay)), max(1, min(aw, w - ax)), ay, ax


def weight(extra: dict, x: "torch.Tensor", area: tuple[int, int, int, int]) -> "torch.Tensor":
    """The entry's weight [1, 1, ah, aw] over its area: strength x mask, or feathered edges."""
    import torch
    import torch.nn.functional as F

    ah, aw, ay, ax = area
    h, w = x.shape[2], x.shape[3]
    mult = torch.full((1, 1, ah, aw), float(extra.get("strength", 1.0)), device=x.device)
    mask = extra.get("mask")
    if mask is not None:
        m = mask.to(x.device, torch.float32)
        m = m.reshape(-1, *m.shape[-2:])[:1].unsqueeze(1)
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        return mult * m[:, :, ay:ay + ah, ax:ax + aw] * float(extra.get("mask_strength", 1.0))
    ramp = [(i + 1) / FEATHER for i in range(FEATHER)]
    for i, r in enumerate(ramp):  # fade in from each inner edge
        if ay > 0 and i < ah:
            mult[:, :, i] *= r
        if ay + ah < h and i < ah:
            mult[:, :, ah - 1 - i] *= r
        if ax > 0 and i < aw:
            mult[:, :, :, i] *= r
        if ax + aw < w and i < aw:
            mult[:, :, :, aw - 1 - i] *= r
    return mult


def with_mask_bounds(extra: dict, h: int, w: int) -> dict:
    """``set_area_to_bounds``: the area becomes the mask's bounding box (ComfyUI's option)."""
    import torch

    mask = extra.get("mask")
    if mask is None or not extra.get("set_area_to_bounds"):
        return extra
    import torch.nn.functional as F

    m = mask.reshape(-1, *mask.shape[-2:])[:1].unsqueeze(1).float()
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    ys, xs = torch.nonzero(m > 0.0, as_tuple=True)
    if len(ys) == 0:
        return extra
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return {**extra, "area": (y1 - y0, x1 - x0, y0, x0)}


def combine(denoiser: Any, side: list[Entry], model_in: "torch.Tensor", t: Any, sigma: float | None) -> "torch.Tensor":
    """The side's network output: entries evaluated on their areas, blended by weight."""
    import torch

    h, w = model_in.shape[2], model_in.shape[3]
    total = torch.zeros_like(model_in, dtype=torch.float32)
    count = torch.full_like(total, 1e-37)
    for entry in side:
        extra = with_mask_bounds(entry.extra, h, w)
        if sigma is not None and ("start_percent" in extra or "end_percent" in extra):
            high, low = sigma_range(extra, denoiser.sigma_at_percent)
            if not low <= sigma <= high:
                continue
        area = area_of(extra, h, w)
        ah, aw, ay, ax = area
        crop = model_in[:, :, ay:ay + ah, ax:ax + aw]
        b = crop.shape[0]
        context = entry.embeds.expand(b, -1, -1).to(device=denoiser.device, dtype=denoiser.dtype)
        size = (ah * 8, aw * 8) if "area" in extra else denoiser.image_size
        kwargs = denoiser.family.network_kwargs([extra], b, size, denoiser.device, denoiser.dtype)
        out = denoiser.call(crop, t, context, kwargs, [extra])
        mult = weight(extra, model_in, area)
        total[:, :, ay:ay + ah, ax:ax + aw] += out * mult
        count[:, :, ay:ay + ah, ax:ax + aw] += mult
    return total / count
