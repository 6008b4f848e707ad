"""ComfyUI's DualModelGuider and CFGOverride: guidance with a second model on the negative side, and a
cfg that changes over a window of noise levels.

* :class:`DualModel` rides on the GUIDER's ``dual`` slot (the one DualCFGGuider and PerpNegGuider
  use; the sampling loop asks it for the denoiser): the positive prompt runs on the guider's model,
  the negative on ``model_negative``, each through an ordinary conditional-only
  :class:`~nodes.families.denoiser.Denoiser` (so areas, masks and timestep ranges follow the usual
  rules), combined as CFG: ``uncond + cfg (cond - uncond)``. At cfg 1 (and no CFGOverride) the negative model
  is neither held on the device nor run, as ComfyUI skips loading it. The second model's network is held only while sampling runs
  (:meth:`DualModel.opened`, entered beside the first by nodes.samplers.custom.sample). Ideogram 4
  is what this is for: its unconditional transformer on the negative side, as Ideogram4Pipeline does.
* CFGOverride keeps its windows on the MODEL (``SamplingPatches.cfg_overrides``); the sampling loop sets
  the denoiser's cfg for each step whose noise level is in one (:func:`applied`): ComfyUI's window
  ``percent_to_sigma(end) < sigma <= percent_to_sigma(start)``, and where windows overlap the one applied
  last (nearest the sampler) wins.

Not as in ComfyUI: the model's CFG-changing patches (RescaleCFG, PAG, the guidance rules) are refused
with DualModelGuider rather than applied, and CFGOverride is refused on guiders without a single cfg
(DualCFGGuider, PerpNegGuider) and on runs at cfg 1 (whose negative is never evaluated).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

from nodes.families.base import ConditioningError
from nodes.families.denoiser import Denoiser, guide

if TYPE_CHECKING:
    import torch

    from nodes.families.base import Family


@dataclasses.dataclass(frozen=True)
class CFGWindow:
    """One CFGOverride: ``cfg`` over the start..end fraction of sampling."""

    cfg: float
    start_percent: float
    end_percent: float


@dataclasses.dataclass(frozen=True, eq=False)
class DualModel:
    """What DualModelGuider adds to a GUIDER: the negative side's model (a MODEL handle)."""

    model_negative: Any
    #: The dual slot's second prompt (none here; nodes.unclip and the inpainting preparation pass it on).
    middle: Any = None
    #: The negative model's network, while :meth:`opened` holds it.
    network: Any = None

    @contextlib.contextmanager
    def opened(self, evaluated: bool) -> Iterator["DualModel"]:
        """This spec with the negative model's network held (loaded, patched) for the run, when the run
        ``evaluated`` its negative side (cfg other than 1, or a CFGOverride that may set one); otherwise
        it is not held, as ComfyUI does not load it onto the device."""
        if not evaluated:
            yield self
            return
        with self.model_negative.unet() as network:
            yield dataclasses.replace(self, network=network)

    def denoiser(self, network: Any, family: "Family", *, positive: Any, negative: Any, cfg: float,
                 cfg_rescale: float = 0.0, pag_scale: float = 0.0, guidance: tuple = (),
                 **common: Any) -> "DualModelDenoiser":
        if cfg_rescale or pag_scale or guidance:
            raise ConditioningError("RescaleCFG, perturbed-attention guidance and the CFG-changing patches guide "
                                    "one model's CFG, not DualModelGuider's two models", "model")
        if self.network is None and float(cfg) != 1.0:  # sampled without opened(True)
            raise ConditioningError("DualModelGuider's negative model is not loaded (run it through "
                                    "SamplerCustomAdvanced)", "model_negative")
        return DualModelDenoiser(self, network, family, positive, negative, float(cfg), common)


class DualModelDenoiser:
    """CFG over two conditional-only Denoisers on two networks, with the surface the sampling loop uses
    (``model_output``, ``last_uncond``, a settable ``cfg``)."""

    def __init__(self, spec: DualModel, network: Any, family: "Family", positive: Any, negative: Any,
                 cfg: float, common: dict) -> None:
        self.cfg = cfg
        #: CFGOverride may move cfg anywhere when the negative model is held (DualModel.opened)
        self.guided = spec.network is not None
        self.cond = Denoiser(network, family, positive=positive, negative=None, cfg=1.0,
                             names=("positive", "positive"), **common)
        self.uncond = None if spec.network is None else Denoiser(
            spec.network, spec.model_negative.family, positive=negative, negative=None, cfg=1.0,
            names=("negative", "negative"), **common)
        self.last_uncond: "torch.Tensor | None" = None

    def model_output(self, model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        cond = self.cond.model_output(model_in, t)
        if self.cfg == 1.0:
            self.last_uncond = cond
            return cond
        self.last_uncond = self.uncond.model_output(model_in, t)
        return guide(cond, self.last_uncond, self.cfg)


def windows(overrides: tuple, schedule: Any) -> list[tuple[float, float, float]]:
    """(cfg, sigma_low, sigma_high) for each override, the last applied first (it wins on overlap)."""
    from nodes.samplers.schedules import percent_to_sigma

    return [(w.cfg, percent_to_sigma(schedule, w.end_percent), percent_to_sigma(schedule, w.start_percent))
            for w in reversed(overrides)]


@contextlib.contextmanager
def applied(denoiser: Any, found: list[tuple[float, float, float]], sigma: float) -> Iterator[None]:
    """The denoiser's cfg set to the first window holding ``sigma`` for one evaluation (as it was after)."""
    cfg = next((c for c, low, high in found if low < sigma <= high), None)
    if cfg is None:
        yield
        return
    if not hasattr(denoiser, "cfg") or not getattr(denoiser, "guided", False):
        raise ConditioningError("CFGOverride changes the cfg of CFG guidance with a negative prompt: this run "
                                "has none (cfg 1, DualCFGGuider or PerpNegGuider)", "model")
    saved = denoiser.cfg
    denoiser.cfg = float(cfg)
    try:
        yield
    finally:
        denoiser.cfg = saved
