"""ComfyUI's dual CFG (the DualCFGGuider node): three prompts and two guidance scales.

With N, M and P the network's predictions for the negative prompt, the second prompt
(``cond2``, ComfyUI's "middle") and the first (``cond1``), s1 = ``cfg_conds`` and
s2 = ``cfg_cond2_negative``:

* regular: N + s2 (M - N) + s1 (P - M): guidance from the negative to cond2, plus
  cond1's push away from cond2;
* nested: N + s2 (T - N) with T = M + s1 (P - M): guidance from cond2 to cond1 first,
  then from the negative to that.

Each style is one ordinary :class:`~nodes.families.denoiser.Denoiser` over a pair of
prompts plus a conditional-only one for the third, so the conditioning rules (areas,
masks, timestep ranges, ControlNets) and the guidance patches stay in one place. The
patches (RescaleCFG, perturbed-attention guidance, the guidance rules) apply to the pair, which is where
ComfyUI applies them: its CFG hook sees (negative, cond2) in the regular style and
(cond2, cond1) in the nested one. That costs two network calls per evaluation where
ComfyUI makes one batch of three.

Across the three prompts, as in ComfyUI:

* the old ControlNetApply's ControlNet on cond1 (``control_apply_to_uncond``) is shared
  with the cond2 and negative entries that carry none; one on cond2 stays cond2's
  (ComfyUI shares only the positive prompt's);
* cond2 is a negative-type prompt: the node marks it ``prompt_type: "negative"``, so
  the SDXL refiner's default aesthetic score for it is the negative's.

``last_uncond``, the unguided prediction the CFG++ samplers step with, is the negative's
N in both styles (ComfyUI's nested style hands them M instead, since its hook sees
the inner pair; N keeps both identities below for CFG++ too). Where a scale makes the
third prompt weightless (regular s1 = 0, nested s2 = 1) it is not evaluated, and the
pair's own rule holds (at s2 = 1 regular never evaluates the negative: M is the
unguided prediction), as Kiln's CFGGuider does at cfg 1.

Identities the tests check: with cond2 = negative, regular is CFG at s1 and nested CFG
at s1 * s2; with cond2 = cond1 both are CFG at s2.

Not as in ComfyUI: an area entry gets its twin (same area, the other prompt) only
within the pair evaluated together, not on all three prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodes.families import conditioning as cond_rules
from nodes.families.denoiser import Denoiser, guide

if TYPE_CHECKING:
    import torch

    from nodes.families.base import Family

STYLES = ("regular", "nested")


@dataclass(frozen=True, eq=False)
class DualCFG:
    """What DualCFGGuider adds to a GUIDER's (cond1, negative, cfg_conds): the second prompt,
    its scale against the negative, and the style."""

    middle: Any
    cfg_middle: float
    nested: bool = False

    def denoiser(self, network: Any, family: "Family", *, positive: Any, negative: Any, cfg: float,
                 **common: Any) -> "DualDenoiser":
        """The sampling loop's denoiser for this guidance (``common``: Denoiser's other keywords)."""
        return DualDenoiser(network, family, self, positive=positive, negative=negative, cfg=cfg, **common)


class DualDenoiser:
    """Dual CFG over two Denoisers, with the surface the sampling loop uses
    (``model_output``, ``last_uncond``)."""

    def __init__(self, network: Any, family: "Family", spec: DualCFG, *, positive: Any, negative: Any, cfg: float,
                 cfg_rescale: float = 0.0, pag_scale: float = 0.0, guidance: tuple = (),
                 **common: Any) -> None:
        cond1, middle, negative = _share_controls(positive, spec.middle, negative)
        self.nested = bool(spec.nested)
        self.cfg_conds, self.cfg_middle = float(cfg), float(spec.cfg_middle)
        patches = dict(cfg_rescale=cfg_rescale, pag_scale=pag_scale, guidance=guidance)
        #: The pair evaluated together, with the guidance patches; the third prompt alone (None: weightless).
        self.pair: Denoiser
        self.third: Denoiser | None = None
        if self.nested:
            self.pair = Denoiser(network, family, positive=cond1, negative=middle, cfg=self.cfg_conds,
                                 names=("cond1", "cond2"), **patches, **common)
            if self.cfg_middle != 1.0:
                self.third = Denoiser(network, family, positive=negative, negative=None, cfg=1.0,
                                      names=("negative", "negative"), **common)
        else:
            self.pair = Denoiser(network, family, positive=middle, negative=negative, cfg=self.cfg_middle,
                                 names=("cond2", "negative"), **patches, **common)
            if self.cfg_conds != 0.0:
                self.third = Denoiser(network, family, positive=cond1, negative=None, cfg=1.0,
                                      names=("cond1", "cond1"), **common)
        #: The negative's prediction at the last call (see the module docstring), for CFG++ samplers.
        self.last_uncond: "torch.Tensor | None" = None

    def model_output(self, model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        """The dual-guided network output for the scheduler-scaled input ``model_in``."""
        pair = self.pair.model_output(model_in, t)
        if self.third is None:
            self.last_uncond = self.pair.last_uncond
            return pair
        third = self.third.model_output(model_in, t)
        if self.nested:
            self.last_uncond = third
            return guide(pair, third, self.cfg_middle)
        self.last_uncond = self.pair.last_uncond
        return pair + self.cfg_conds * (third - self.pair.last_cond)


def _share_controls(cond1: Any, middle: Any, negative: Any) -> tuple[list, list, list]:
    """The three prompts, checked (errors name the input), with cond1's ControlNet shared the
    way ComfyUI shares a positive prompt's; cond2's own stays unshared. Copies: the inputs
    (cached node outputs) are left as they were."""
    from nodes.control.apply import share_with_uncond

    first = cond_rules.entries(cond1, "cond1")
    second = cond_rules.entries(middle, "cond2")
    last = cond_rules.entries(negative, "negative")
    for entry in second:  # the pair denoiser would otherwise share cond2's with the negative
        entry.extra["control_apply_to_uncond"] = False
    for side in (second, last):
        share_with_uncond(first, side)
    first_cond, second_cond, last_cond = ([[e.embeds, e.extra] for e in side] for side in (first, second, last))
    return first_cond, second_cond, last_cond
