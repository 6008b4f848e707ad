"""Perp-Neg (Armandpour et al. 2023), ComfyUI's PerpNegGuider: the negative prompt pushes
only along what it does *not* share with the positive one, so a negative that overlaps the
positive ("a cat" against "a cat wearing a hat") stops cancelling the subject.

Measured from the empty prompt's prediction E, with P and N the positive's and negative's
(clean-latent predictions, as ComfyUI computes them):

    p = P - E,  n = N - E,  n_perp = n - (<n, p> / |p|^2) p,
    result = E + cfg * (p - neg_scale * n_perp).

As in ComfyUI the projection is taken over the whole batch at once (one dot product and one
norm), and the result replaces the CFG combination (so RescaleCFG is not applied, as
ComfyUI's guider bypasses its CFG function) while the other guidance rules still run:
their pre-stage on (positive, negative), their post-stage on the result.

The deprecated PerpNeg MODEL patch is the same with the negative left out at cfg 1; its
handle carries a PerpNeg (``SamplingPatches.perp_neg``) that the samplers use as the guider's.
The guider rides on the GUIDER's second-prompt slot (``Guider.dual``, which DualCFGGuider
uses too): ``middle`` is the empty conditioning, prepared for inpainting models with the
others. The positive and negative are evaluated as one batch, the empty prompt as a
second call (ComfyUI batches all three).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nodes.families.denoiser import Denoiser
from nodes.families.guidance_rules import Rule, Step

if TYPE_CHECKING:
    import torch

    from nodes.families.base import Family


@dataclass(frozen=True, eq=False)
class PerpNeg:
    """What PerpNegGuider adds to a GUIDER's (positive, negative, cfg)."""

    middle: Any
    neg_scale: float
    #: The node input the empty prompt came from, which errors about it name.
    middle_input: str = "empty_conditioning"
    #: Evaluate the negative at cfg 1 too (the guider does; the deprecated MODEL patch, a CFG
    #: function in ComfyUI, sees zeros for it there, as every CFG hook does at cfg 1).
    always_guided: bool = True

    def denoiser(self, network: Any, family: "Family", *, positive: Any, negative: Any, cfg: float,
                 **common: Any) -> "PerpNegDenoiser":
        """The sampling loop's denoiser for this guidance (``common``: Denoiser's other keywords)."""
        return PerpNegDenoiser(network, family, self, positive=positive, negative=negative, cfg=cfg, **common)


@dataclass(eq=False)
class _EmptyPrediction:
    """The empty prompt's network output at the evaluation in progress."""

    output: Any = None


@dataclass(frozen=True, eq=False)
class PerpNegCombine(Rule):
    """Perp-Neg's combination as a guidance rule (see the module docstring)."""

    neg_scale: float
    empty: _EmptyPrediction
    stage: ClassVar[str] = "combine"

    def combine(self, step: Step) -> Any:
        e0 = step.space.to_x0(self.empty.output[step.rows])
        p, n = step.cond - e0, step.uncond - e0
        n_perp = n - ((n * p).sum() / p.pow(2).sum()) * p
        return e0 + step.scale * (p - self.neg_scale * n_perp)


class PerpNegDenoiser:
    """Perp-Neg over two Denoisers, with the surface the sampling loop uses (``model_output``,
    ``last_uncond``)."""

    def __init__(self, network: Any, family: "Family", spec: PerpNeg, *, positive: Any, negative: Any, cfg: float,
                 cfg_rescale: float = 0.0, pag_scale: float = 0.0, guidance: tuple = (), **common: Any) -> None:
        self._empty = _EmptyPrediction()
        rules = tuple(guidance) + (PerpNegCombine(float(spec.neg_scale), self._empty),)
        self.pair = Denoiser(network, family, positive=positive, negative=negative, cfg=cfg, pag_scale=pag_scale,
                             guidance=rules, always_guided=spec.always_guided, **common)
        self.empty = Denoiser(network, family, positive=spec.middle, negative=None, cfg=1.0,
                              names=(spec.middle_input, spec.middle_input), **common)
        #: The negative's prediction at the last call, for CFG++ samplers.
        self.last_uncond: "torch.Tensor | None" = None

    def model_output(self, model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        """The Perp-Neg-guided network output for the scheduler-scaled input ``model_in``."""
        self._empty.output = self.empty.model_output(model_in, t)
        out = self.pair.model_output(model_in, t)
        self.last_uncond = self.pair.last_uncond
        return out
