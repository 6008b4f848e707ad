"""How several conditionings on one side of guidance combine, as ComfyUI defines it.

A CONDITIONING is a list of ``[embeds, extras]`` entries. Each entry is evaluated
on its region of the latent (``area``: ``(h, w, y, x)`` in latent pixels, or
``("percentage", h, w, y, x)`` in fractions of the latent), weighted by
``strength`` and by an optional ``mask`` (times ``mask_strength``), and counted
only while the noise level is inside its timestep range (``start_percent`` ..
``end_percent`` of the model's schedule, 0 = the noisiest end). A side's output
is the weighted sum of its entries' outputs divided by the summed weights, so
overlapping prompts blend and a lone entry's strength cancels out. An area
without a mask fades in over up to 8 latent pixels (a quarter of its size at
most) along each edge that is not the latent's border, so areas blend seamlessly.
``set_area_to_bounds`` turns a mask into an area: its bounding box, at least 8x8.

Like ComfyUI, each area entry on one side gets a twin on the other side (same
area, strength, mask and range) carrying the other side's prompt, taken from the
smallest of its entries whose area contains it (else its first entry without an
area). Guidance then compares like with like inside every area.

A latent pixel that no entry covers (no area reaches it, or only zero mask
weight) gets ComfyUI's prediction there: a clean latent of zero, written in the
network's own parametrisation (epsilon, v, or a flow model's velocity).

Entries with the same crop and token count are evaluated in one network call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from nodes.families.base import ConditioningError

if TYPE_CHECKING:
    import torch

#: Keys that make an entry need the general path (anything else rides along in extras).
REGIONAL_KEYS = ("area", "mask", "start_percent", "end_percent", "strength")
#: Keys that describe where and when an entry applies (copied to its twin on the other side).
PLACEMENT_KEYS = ("area", "mask", "mask_strength", "strength", "start_percent", "end_percent", "set_area_to_bounds")
FEATHER = 8
MIN_BOUNDS = 8


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


class PerJob(list):
    """A side's conditioning in a cross-job batch: one plain ``[embeds, extras]`` entry per job.

    KSampler's batched run (nodes/sampling.py) gives the sampler several queued
    jobs' latents one after the other, each job the same number of images; entry
    j conditions job j's images only (the denoiser stacks one context row per
    image, and the family's per-conditioning extras, such as SDXL's pooled text
    and size ids or FLUX's pooled text and guidance, follow the same rows). A plain
    list instead means entries that combine over the whole batch (areas, masks).
    """


def is_plain(side: list[Entry]) -> bool:
    """One entry over the whole latent at full strength for every step."""
    if len(side) != 1:
        return False
    extra = side[0].extra
    return all(k not in extra for k in REGIONAL_KEYS if k != "strength") and float(extra.get("strength", 1.0)) == 1.0


#: The most a prompt is repeated to share a batch with a longer one (ComfyUI's limit); beyond
#: it the two are evaluated in separate network calls (nodes.families.token_groups).
MAX_REPEAT = 4


def match_tokens(a: "torch.Tensor", b: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Equal token counts for two prompts that share a batch, where that is cheap.

    Long prompts are encoded in 77-token windows, so two prompts of different
    lengths are repeated up to their least common multiple, as ComfyUI does
    (attention over a key list repeated k times gives the same result). Lengths with
    a large common multiple (a FLUX prompt of 512 T5 tokens beside one with 729 Redux
    image tokens appended: 635,392) are returned as they are, to be evaluated apart.
    """
    ta, tb = a.shape[1], b.shape[1]
    if ta == tb:
        return a, b
    n = math.lcm(ta, tb)
    if n // min(ta, tb) > MAX_REPEAT:
        return a, b
    return a.repeat(1, n // ta, 1), b.repeat(1, n // tb, 1)


# -- resolving placement once per sampling run ----------------------------------------------


def _mask_bounds(mask: "torch.Tensor") -> tuple[int, int, int, int]:
    """ComfyUI's ``set_area_to_bounds``: the bounding box of the mask's nonzero pixels, at least 8x8."""
    import torch

    bounds = mask.abs().amax(dim=0)
    ys, xs = torch.nonzero(bounds, as_tuple=True)
    if len(ys) == 0:  # an all-zero mask weighs nothing anyway
        return MIN_BOUNDS, MIN_BOUNDS, 0, 0
    y0, x0 = int(ys.min()), int(xs.min())
    return max(MIN_BOUNDS, int(ys.max()) - y0 + 1), max(MIN_BOUNDS, int(xs.max()) - x0 + 1), y0, x0


def resolve(entry: Entry, h: int, w: int, device: Any) -> Entry:
    """Percentage areas in latent pixels, masks as [B, h, w] on the device, mask bounds as areas."""
    import torch
    import torch.nn.functional as F

    extra = dict(entry.extra)
    area = extra.get("area")
    if area is not None and area[0] == "percentage":
        fh, fw, fy, fx = (float(v) for v in area[1:5])
        extra["area"] = (max(1, round(fh * h)), max(1, round(fw * w)), round(fy * h), round(fx * w))
    elif area is not None:
        extra["area"] = tuple(int(v) for v in area[:4])
    mask = extra.get("mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            raise ConditioningError("a conditioning mask must be a MASK tensor [B, H, W]", extra["_input"])
        m = mask.to(device=device, dtype=torch.float32)
        m = m.unsqueeze(0) if m.ndim == 2 else m
        if tuple(m.shape[1:]) != (h, w):
            m = F.interpolate(m.unsqueeze(1), size=(h, w), mode="bilinear").squeeze(1)
        extra["mask"] = m
        if extra.get("set_area_to_bounds"):
            extra["area"] = _mask_bounds(m)
    return replace(entry, extra=extra)


def _inside(inner: tuple, outer: tuple) -> bool:
    return inner[2] >= outer[2] and inner[3] >= outer[3] and \
        inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3]


def add_twins(side: list[Entry], other: list[Entry]) -> None:
    """For each area entry of ``other``, a twin on ``side`` with ``side``'s prompt (ComfyUI's
    ``create_cond_with_same_area_if_none``); appends to ``side``."""
    for entry in list(other):
        area = entry.extra.get("area")
        if area is None:
            continue
        source = None
        for candidate in side:
            a = candidate.extra.get("area")
            if a is None:
                source = source or candidate
            elif _inside(area, a):
                s = source.extra.get("area") if source is not None else None
                if source is None or s is None or math.prod(s[:2]) > math.prod(a[:2]):
                    source = candidate
        if source is None or source.extra.get("area") == area:
            continue
        extra = {k: v for k, v in source.extra.items() if k not in PLACEMENT_KEYS}
        extra.update({k: entry.extra[k] for k in PLACEMENT_KEYS if k in entry.extra})
        extra["_input"] = source.extra["_input"]
        side.append(Entry(source.embeds, extra))


def prepare(positive: list[Entry], negative: list[Entry], h: int, w: int, device: Any) -> tuple[list, list]:
    """Both sides resolved for an h x w latent, with each side's area twins added."""
    pos = [resolve(e, h, w, device) for e in positive]
    neg = [resolve(e, h, w, device) for e in negative]
    if neg:
        add_twins(neg, pos)
        add_twins(pos, neg)
    return pos, neg


# -- one evaluation ------------------------------------------------------------------------------


def sigma_range(extra: dict, sigma_at_percent: Any) -> tuple[float, float]:
    """(highest, lowest) noise level at which the entry counts."""
    start, end = float(extra.get("start_percent", 0.0)), float(extra.get("end_percent", 1.0))
    return sigma_at_percent(start), sigma_at_percent(end)


def area_of(extra: dict, h: int, w: int) -> tuple[int, int, int, int] | None:
    """(height, width, y, x) of the entry's region, cut to the latent; None if it lies outside."""
    area = extra.get("area")
    if area is None:
        return h, w, 0, 0
    ah, aw, ay, ax = area
    ay, ax = max(0, ay), max(0, ax)
    ah, aw = min(h - ay, ah), min(w - ax, aw)
    if ah <= 0 or aw <= 0:
        return None
    return ah, aw, ay, ax


def weight(extra: dict, batch: int, area: tuple[int, int, int, int], h: int, w: int,
           device: Any = None) -> "torch.Tensor":
    """The entry's weight [B or 1, 1, ah, aw] over its area: strength x mask, or feathered edges."""
    import torch

    ah, aw, ay, ax = area
    strength = float(extra.get("strength", 1.0))
    mask = extra.get("mask")
    if mask is not None:
        m = mask[:batch, ay:ay + ah, ax:ax + aw]
        if m.shape[0] != batch and batch % m.shape[0] == 0:
            m = m.repeat(batch // m.shape[0], 1, 1)
        elif m.shape[0] != batch:
            m = m[:1]
        return (m * float(extra.get("mask_strength", 1.0))).unsqueeze(1) * strength
    mult = torch.full((1, 1, ah, aw), strength, device=device)
    if "area" not in extra:
        return mult
    for dim, (size, offset, full) in enumerate(((ah, ay, h), (aw, ax, w))):
        rr = min(FEATHER, size // 4)
        for t in range(rr):
            ramp = (t + 1) / rr
            if offset != 0:
                mult.narrow(dim + 2, t, 1).mul_(ramp)
            if size + offset < full:
                mult.narrow(dim + 2, size - 1 - t, 1).mul_(ramp)
    return mult


@dataclass
class _Job:
    side: int
    entry: Entry
    area: tuple[int, int, int, int]


def fill_uncovered(out: "torch.Tensor", covered: "torch.Tensor", model_in: "torch.Tensor", sigma: float,
                   prediction_type: str, sigma_data: float = 1.0) -> "torch.Tensor":
    """``out`` where an entry covers the pixel; elsewhere the output whose clean-latent
    prediction is zero (ComfyUI's result there, whose weighted sum is 0 / 1e-37).

    ``model_in`` is the variance-preserving sample ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``
    with ``sigma^2 = (1 - a) / a``; x0 = 0 means eps = x_t sqrt(sigma^2 + 1) / sigma and v = x_t / sigma.
    A flow model ("flow") sees its state ``x_t = (1 - sigma) x0 + sigma noise`` unscaled and predicts
    the velocity ``noise - x0``, so ``x0 = x_t - sigma v``: x0 = 0 means v = x_t / sigma. (Its output
    of zero would mean x0 = x_t: the region would keep its noise to the end.) A continuous-EDM
    model's F-prediction (``edm``, input x / sqrt(sigma^2 + sigma_data^2)) gives x0 = 0 at
    F = -sigma_data model_in / sigma; its eps and v run at sigma_data 1, the formulas above.
    """
    import torch

    if bool(covered.all()):
        return out
    if prediction_type == "epsilon":
        empty = model_in * (math.sqrt(sigma ** 2 + 1.0) / sigma)
    elif prediction_type in ("v_prediction", "flow"):  # the same number in both parametrisations
        empty = model_in / sigma
    elif prediction_type == "edm":
        empty = model_in * (-sigma_data / sigma)
    else:
        empty = torch.zeros_like(model_in)
    return torch.where(covered, out, empty.to(out.dtype))


def combine(denoiser: Any, sides: list[list[Entry]], model_in: "torch.Tensor", t: Any,
            sigma: float | None) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """Each side's (network output, mask of the pixels some entry covers with nonzero weight):
    entries evaluated on their areas and blended by weight.

    Entries of all sides with the same crop, token count and call key (Family.call_key) share one
    network call.
    """
    import torch

    b, _, h, w = model_in.shape
    jobs = []
    for i, side in enumerate(sides):
        for entry in side:
            extra = entry.extra
            if sigma is not None and ("start_percent" in extra or "end_percent" in extra):
                high, low = sigma_range(extra, denoiser.sigma_at_percent)
                if not low <= sigma <= high:
                    continue
            area = area_of(extra, h, w)
            if area is not None:
                jobs.append(_Job(i, entry, area))
    totals = [torch.zeros_like(model_in, dtype=torch.float32) for _ in sides]
    counts = [torch.full_like(tot, 1e-37) for tot in totals]
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        key = (job.area, job.entry.embeds.shape[1], denoiser.family.call_key(job.entry.extra))
        groups.setdefault(key, []).append(job)
    for (area, _, _), group in groups.items():
        ah, aw, ay, ax = area
        crop = model_in[:, :, ay:ay + ah, ax:ax + aw]
        context = torch.cat([j.entry.embeds.expand(b, -1, -1) for j in group]).to(denoiser.device, denoiser.dtype)
        extras = [j.entry.extra for j in group]
        kwargs = denoiser.family.network_kwargs(extras, b, denoiser.image_size, denoiser.device, denoiser.dtype)
        out = denoiser.call(crop.repeat(len(group), 1, 1, 1), t, context, kwargs, extras)
        for k, job in enumerate(group):
            mult = weight(job.entry.extra, b, area, h, w, out.device)
            totals[job.side][:, :, ay:ay + ah, ax:ax + aw] += out[k * b:(k + 1) * b] * mult
            counts[job.side][:, :, ay:ay + ah, ax:ax + aw] += mult
    return [(tot / cnt, cnt > 1e-37) for tot, cnt in zip(totals, counts)]
