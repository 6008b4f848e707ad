"""How a ControlNet acts during sampling: residuals added to the UNet's skip connections.

A CONDITIONING entry carries its control in ``extra["control"]``: a
:class:`ControlLink`, whose ``previous`` is the control that was on the entry before
(ControlNets stacked by chaining apply nodes, as ComfyUI chains them). At each network
call the denoiser asks :func:`residuals` for the rows of its batch: every link of an
entry's chain whose range holds the current noise level runs its ControlNet on those
rows (same latent, timestep, prompt and family keyword arguments as the UNet) and the
outputs, each times its strength, are summed. Rows whose entry has no control get
zeros. Entries that share one chain (ControlNetApplyAdvanced puts the same link on
positive and negative) share one ControlNet call, as diffusers batches it.

The hint is the IMAGE in 0..1 (channels first), resized to the latent's pixel size by
ComfyUI's rule (nearest-exact, centre crop) when it differs, and repeated over the batch.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from nodes.families.base import ConditioningError

if TYPE_CHECKING:
    import torch


@dataclass(eq=False)
class ControlNetHandle:
    """CONTROL_NET: a ControlNet the model manager holds, and what it is for."""

    name: str
    family: Any
    config: dict[str, Any]
    #: Returns a context manager yielding the ControlNetModel on the compute device.
    _use: Callable[[], contextlib.AbstractContextManager]

    def use(self) -> contextlib.AbstractContextManager:
        return self._use()

    def __kiln_nbytes__(self) -> int:
        return 0


@dataclass(eq=False)
class ControlLink:
    """One applied ControlNet: network, hint, strength and range, on top of ``previous``."""

    net: ControlNetHandle
    hint: "torch.Tensor"  # [B, 3, H, W] in 0..1
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: "ControlLink | None" = None
    applied_by: str = "ControlNetApplyAdvanced"

    def chain(self) -> list["ControlLink"]:
        links, link = [], self
        while link is not None:
            links.append(link)
            link = link.previous
        return links[::-1]

    def __kiln_nbytes__(self) -> int:
        return sum(link.hint.numel() * link.hint.element_size() for link in self.chain())


def mismatch(net: ControlNetHandle, family: Any, unet_config: Any) -> str | None:
    """Why ``net`` cannot drive this UNet (None if it can)."""
    if net.family.name != family.name:
        return f"it is a {net.family.name} ControlNet and the model is {family.name}"
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        mine, theirs = net.config.get(key), unet_config.get(key) if unet_config is not None else None
        if theirs is not None and mine is not None and tuple(_seq(mine)) != tuple(_seq(theirs)):
            return f"its {key} is {mine}, the model's {theirs}"
    return None


def _seq(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def hint_for(link: ControlLink, rows: int, height: int, width: int) -> "torch.Tensor":
    """The hint at the latent's pixel size, one per row (ComfyUI's resize and batch rule)."""
    import torch

    from nodes.resample import resize

    hint = link.hint
    if tuple(hint.shape[2:]) != (height, width):
        hint = resize(hint, width, height, "nearest-exact", "center")
    n = hint.shape[0]
    if n != rows:
        per = [hint[min(i % n if rows % n == 0 else i, n - 1)] for i in range(rows)]
        hint = torch.stack(per)
    return hint


def _accepted(network: Any) -> set[str]:
    return set(inspect.signature(network.forward).parameters)


def _run(link: ControlLink, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict,
         image_size: tuple[int, int]) -> tuple[list, Any]:
    import torch

    with link.net.use() as network:
        dtype = network.dtype
        hint = hint_for(link, x.shape[0], x.shape[2] * 8, x.shape[3] * 8).to(x.device, dtype)
        accepted = _accepted(network)
        extra = {k: v for k, v in kwargs.items() if k in accepted}
        down, mid = network(x.to(dtype), t, encoder_hidden_states=context.to(dtype), controlnet_cond=hint,
                            conditioning_scale=float(link.strength), return_dict=False, **extra)
    return [d.to(torch.float32) for d in down], mid.to(torch.float32)


def residuals(denoiser: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor",
              extras: list[dict]) -> dict[str, Any]:
    """The UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual``
    for a call over ``extras`` (each ``x.shape[0] // len(extras)`` rows); {} without control."""
    import torch

    chains = [e.get("control") for e in extras]
    if all(c is None for c in chains):
        return {}
    per = x.shape[0] // len(extras)
    sigma = None
    groups: dict[int, tuple[ControlLink, list[int]]] = {}
    for i, chain in enumerate(chains):
        if chain is None:
            continue
        if not isinstance(chain, ControlLink):
            raise ConditioningError("the conditioning's 'control' is not a ControlNet applied by a ControlNet "
                                    "node", extras[i].get("_input", "positive"))
        groups.setdefault(id(chain), (chain, []))[1].append(i)
    down_total: list | None = None
    mid_total = None
    for chain, idx in groups.values():
        rows = torch.cat([torch.arange(i * per, (i + 1) * per) for i in idx]).to(x.device)
        sub_extras = [extras[i] for i in idx]
        kwargs = denoiser.family.network_kwargs(sub_extras, per, denoiser.image_size, denoiser.device,
                                                denoiser.dtype)
        for link in chain.chain():
            why = mismatch(link.net, denoiser.family, getattr(denoiser.network, "config", None))
            if why:
                raise ConditioningError(f"the ControlNet {link.net.name!r} applied by {link.applied_by} cannot "
                                        f"control this model: {why}", sub_extras[0].get("_input", "positive"))
            if link.start_percent > 0.0 or link.end_percent < 1.0:
                if sigma is None:
                    sigma = float(denoiser.schedule.sigma(float(t))) if denoiser.schedule is not None else 0.0
                high, low = denoiser.sigma_at_percent(link.start_percent), denoiser.sigma_at_percent(link.end_percent)
                if not low <= sigma <= high:
                    continue
            down, mid = _run(link, x[rows], t, context[rows], kwargs, denoiser.image_size)
            if down_total is None:
                down_total = [torch.zeros((x.shape[0], *d.shape[1:]), device=d.device) for d in down]
                mid_total = torch.zeros((x.shape[0], *mid.shape[1:]), device=mid.device)
            for total, d in zip(down_total, down):
                total[rows] += d
            mid_total[rows] += mid
    if down_total is None:  # no link in range at this step
        return {}
    return {"down_block_additional_residuals": tuple(d.to(denoiser.dtype) for d in down_total),
            "mid_block_additional_residual": mid_total.to(denoiser.dtype)}


__all__ = ["ControlNetHandle", "ControlLink", "residuals", "mismatch", "hint_for", "share_with_uncond"]


def share_with_uncond(positive: list, negative: list) -> None:
    """ComfyUI's rule for the old ControlNetApply (``control_apply_to_uncond``): negative
    entries without a control get the positive's, so guidance compares like with like."""
    source = next((e.extra["control"] for e in positive
                   if e.extra.get("control") is not None and e.extra.get("control_apply_to_uncond")), None)
    if source is None:
        return
    for entry in negative:
        if entry.extra.get("control") is None:
            entry.extra["control"] = source
