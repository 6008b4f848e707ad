"""How a ControlNet acts during sampling: its residuals added to the model's network.

A CONDITIONING entry carries its control in ``extra["control"]``: a
:class:`ControlLink`, whose ``previous`` is the control that was on the entry before
(ControlNets stacked by chaining apply nodes, as ComfyUI chains them). At each network
call the denoiser asks :func:`residuals` for the rows of its batch: every link of an
entry's chain whose range holds the current noise level runs its ControlNet on those
rows (same latent, timestep, prompt and family keyword arguments as the model) and the
outputs, each times its strength, are summed. What a ControlNet returns and which network
keywords carry it is the family's (:meth:`~nodes.families.base.Family.run_controlnet`:
the UNet's down/mid residuals in nodes/control/unet.py, FLUX's and SD3's per-block samples
in nodes/control/flux.py and sd3.py). Rows whose entry has no control get
zeros. Entries that share one chain (ControlNetApplyAdvanced puts the same link on
positive and negative) share one ControlNet call, as diffusers batches it; each row reads its own
prompt, except in a family whose ControlNets read the positive prompt on both sides (Qwen-Image,
``Family.controlnet_reads_positive_prompt``: the prompt the link was applied with).

The hint is the IMAGE in 0..1 (channels first), resized to the latent's pixel size by
ComfyUI's rule (nearest-exact, centre crop) when it differs, and repeated over the batch;
a family whose ControlNets read latents (FLUX, SD3) encodes it with the apply node's VAE
(:func:`latent_hint`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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
    #: A union ControlNet's control type (SetUnionControlNetType); None is ComfyUI's "auto".
    mode: int | None = None

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
    #: The VAE that turns the hint into latents, for ControlNets that read latents (FLUX).
    vae: Any = None
    #: An inpainting ControlNet's kept mask [B, 1, h, w] (1 keep, 0 repaint); None keeps everything.
    mask: "torch.Tensor | None" = None
    #: (embeds, extra) of the positive prompt it was applied with, for families whose ControlNets read
    #: that prompt on both sides of guidance (``Family.controlnet_reads_positive_prompt``); else None.
    prompt: Any = None
    #: Hints already brought to a latent size, by the family that made them (kept for the run).
    cache: dict = field(default_factory=dict, repr=False)

    def chain(self) -> list["ControlLink"]:
        links, link = [], self
        while link is not None:
            links.append(link)
            link = link.previous
        return links[::-1]

    def __kiln_nbytes__(self) -> int:
        return sum(link.hint.numel() * link.hint.element_size()
                   + (link.mask.numel() * link.mask.element_size() if link.mask is not None else 0)
                   for link in self.chain())


def mismatch(net: ControlNetHandle, family: Any, unet_config: Any) -> str | None:
    """Why ``net`` cannot drive this model (None if it can): another family group, or a config
    entry the two must share (``unet_config``: the model network's config) that differs."""
    if net.family.controlnet_group != family.controlnet_group:
        return f"it is a {net.family.name} ControlNet and the model is {family.name}"
    for key in family.controlnet_shared_config:
        mine, theirs = net.config.get(key), unet_config.get(key) if unet_config is not None else None
        if theirs is not None and mine is not None and tuple(_seq(mine)) != tuple(_seq(theirs)):
            return f"its {key} is {mine}, the model's {theirs}"
    return None


def _seq(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def hint_for(link: ControlLink, rows: int, height: int, width: int) -> "torch.Tensor":
    """The hint at the latent's pixel size, one per row (ComfyUI's resize and batch rule)."""
    from nodes.resample import resize

    hint = link.hint
    if tuple(hint.shape[2:]) != (height, width):
        hint = resize(hint, width, height, "nearest-exact", "center")
    return to_rows(hint, rows)


def latent_hint(link: ControlLink, h: int, w: int, to_model: Callable, what: str) -> "torch.Tensor":
    """The hint VAE-encoded with the apply node's VAE (the posterior mean, as ComfyUI encodes) at
    the latent's size ``h`` x ``w``, through ``to_model`` into the space the ControlNet reads; once
    per size and rule (``what``: the family the ControlNet is, for messages)."""
    if link.vae is None:
        raise ConditioningError(f"the {what} ControlNet {link.net.name!r} reads its hint as latents: apply it with "
                                "ControlNetApplyAdvanced and connect its vae input", "positive")
    key = ("latent", what, h, w)
    if key not in link.cache:
        pixels = hint_for(link, link.hint.shape[0], h * 8, w * 8)
        raw = link.vae.encode(pixels.movedim(1, -1))
        if tuple(raw.shape[2:]) != (h, w):
            raise ConditioningError(f"the vae given to {link.applied_by} makes {raw.shape[2]}x{raw.shape[3]} latents "
                                    f"of a {w * 8}x{h * 8} hint, the model samples {w}x{h}: it is not the model's "
                                    "VAE", "positive")
        link.cache[key] = to_model(raw)
    return link.cache[key]


def to_rows(hint: "torch.Tensor", rows: int) -> "torch.Tensor":
    """One hint per row: a batch that divides the rows repeats, a shorter one repeats its last."""
    import torch

    n = hint.shape[0]
    if n == rows:
        return hint
    return torch.stack([hint[min(i % n if rows % n == 0 else i, n - 1)] for i in range(rows)])


def _prompt(link: ControlLink, family: Any, context: "torch.Tensor", kwargs: dict,
            denoiser: Any) -> tuple["torch.Tensor", dict]:
    """The prompt rows a ControlNet reads: each row's own, or, for a family whose ControlNets read the
    positive prompt on both sides (Qwen-Image, as diffusers), the one the link was applied with."""
    if link.prompt is None:  # set by the apply node where the family says so
        return context, kwargs
    embeds, extra = link.prompt
    rows = context.shape[0]
    prompt = embeds[:1].to(context.device, context.dtype).expand(rows, -1, -1)
    return prompt, family.network_kwargs([extra], rows, denoiser.image_size, denoiser.device, denoiser.dtype)


def _run(link: ControlLink, family: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict,
         model_config: Any, model: Any) -> dict[str, list]:
    with link.net.use() as network:
        if model is None:
            return family.run_controlnet(network, link, x, t, context, kwargs, model_config)
        return family.run_controlnet(network, link, x, t, context, kwargs, model_config, model=model)


def _add(totals: dict[str, list], out: dict[str, list], rows: "torch.Tensor", batch: int) -> None:
    """Add one ControlNet's residuals for ``rows`` into the per-key totals over the whole batch."""
    import torch

    for key, tensors in out.items():
        if key not in totals:
            totals[key] = [torch.zeros((batch, *r.shape[1:]), device=r.device) for r in tensors]
        if len(totals[key]) != len(tensors):
            raise ConditioningError(f"stacked ControlNets give {len(totals[key])} and {len(tensors)} residuals for "
                                    f"{key}: they were made for different models", "positive")
        for total, r in zip(totals[key], tensors):
            total[rows] += r


def residuals(denoiser: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor",
              extras: list[dict]) -> dict[str, Any]:
    """The network keywords carrying every in-range ControlNet's residuals for a call over
    ``extras`` (each ``x.shape[0] // len(extras)`` rows); {} without control. Which keywords
    (the UNet's down/mid residuals, FLUX's per-block samples) is the family's business."""
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
    family = denoiser.family
    model = getattr(denoiser.network, "kiln_network", denoiser.network)
    model_config = getattr(model, "config", None)
    # only a family whose ControlNets borrow the model's layers is handed the model (SD3.5 Large's)
    lender = model if family.controlnet_borrows_layers else None
    totals: dict[str, list] = {}
    for chain, idx in groups.values():
        rows = torch.cat([torch.arange(i * per, (i + 1) * per) for i in idx]).to(x.device)
        sub_extras = [extras[i] for i in idx]
        kwargs = family.network_kwargs(sub_extras, per, denoiser.image_size, denoiser.device, denoiser.dtype)
        for link in chain.chain():
            why = mismatch(link.net, family, model_config)
            if why:
                raise ConditioningError(f"the ControlNet {link.net.name!r} applied by {link.applied_by} cannot "
                                        f"control this model: {why}", sub_extras[0].get("_input", "positive"))
            if link.start_percent > 0.0 or link.end_percent < 1.0:
                if sigma is None:
                    sigma = float(denoiser.schedule.sigma(float(t))) if denoiser.schedule is not None else 0.0
                high, low = denoiser.sigma_at_percent(link.start_percent), denoiser.sigma_at_percent(link.end_percent)
                if not low <= sigma <= high:
                    continue
            prompt, prompt_kwargs = _prompt(link, family, context[rows], kwargs, denoiser)
            _add(totals, _run(link, family, x[rows], t, prompt, prompt_kwargs, model_config, lender), rows, x.shape[0])
    if not totals:  # no link in range at this step
        return {}
    return family.controlnet_inputs({k: [r.to(denoiser.dtype) for r in v] for k, v in totals.items()})


__all__ = ["ControlNetHandle", "ControlLink", "residuals", "mismatch", "hint_for", "share_with_uncond",
           "with_model_control"]


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


def with_model_control(entries: list, control: "ControlLink | None") -> None:
    """A model-level ControlNet chain (ComfyUI's model patches: QwenImageDiffsynthControlnet) acts on every
    call, whatever the conditioning: it is stacked over each entry's own chain, one copy per distinct chain
    (sharing the model links' encoded hints), so rows that shared a chain still share one ControlNet call."""
    if control is None:
        return
    import dataclasses

    stacked: dict[int, ControlLink] = {}
    for entry in entries:
        own = entry.extra.get("control")
        if id(own) not in stacked:
            top = own
            for link in control.chain():
                top = dataclasses.replace(link, previous=top, cache=link.cache) if own is not None else link
            stacked[id(own)] = top
        entry.extra["control"] = stacked[id(own)]
