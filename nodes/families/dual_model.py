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

The model's CFG patches act as ComfyUI's DualModelGuider applies them: its predict_noise evaluates each
side on its own model with the guider's model_options (the positive ``model``'s) and hands both predictions
to that model's CFG function. So RescaleCFG, RenormCFG and the post-CFG rules (CFGZeroStar, CFGNorm,
Mahiro, Epsilon Scaling) combine the positive model's prediction with the negative model's as their
unconditional one, and PAG's perturbed pass runs on the positive model with the positive prompt
(:class:`DualModelDenoiser`, through the combination step Denoiser shares). What ComfyUI's guider leaves
out is refused when the guider is made, naming the input (:func:`check_guider`): the pre-CFG rules (APG,
TCFG, FreSca, LatentApplyOperationCFG: it never calls the pre-CFG hooks), any of these patches at cfg 1
without a CFGOverride (it returns the positive prediction with no CFG function), and guidance patches on
``model_negative`` that ``model`` lacks (its options are never read). Steps a CFGOverride window sets to
cfg 1 are the positive prediction alone, unpatched, as in ComfyUI.

The model's other patches follow ComfyUI's guider too. LoRAs and the attention multipliers are each
handle's own (``ModelHandle.unet`` patches the weights), as ComfyUI loads each model with its own weight
patches. The hooks the sampling loop puts on a network (FreeU, Deep Shrink, HyperTile, ToMe, FluxKVCache,
DiffSynth's blockwise ControlNets and the model's own ControlNet, :data:`NETWORK_PATCHES`) are model
options in ComfyUI, and its guider runs the negative pass with the positive ``model``'s options: so ``model``'s
hooks go on both networks (:meth:`DualModel.apart` hands the loop the negative network to hook with them)
and ``model_negative``'s are not used; the node says so where ``model_negative`` carries one ``model`` lacks
(:func:`notes`). Where the two MODELs are one loaded network (one module cannot carry two sets of weights in
one step) their LoRAs must agree, and are then applied once (:func:`check_shared`). The sampling-level
patches (EasyCache/LazyCache, DifferentialDiffusion, SAG, skip-layer guidance) are the guider's model's, as
ComfyUI's; on ``model_negative`` alone they are refused with the guidance patches.

Not as in ComfyUI: CFGOverride is refused on guiders without a single cfg (DualCFGGuider, PerpNegGuider)
and on runs at cfg 1 (whose negative is never evaluated); with DualModelGuider the deprecated PerpNeg patch
(a CFG function of its own), SelfAttentionGuidance and skip-layer guidance (post-CFG passes over the
guider's own prompts, nodes.samplers.loop) are refused rather than applied.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

from nodes.families.base import ConditioningError
from nodes.families.denoiser import Denoiser

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
    #: The negative model's network is the positive one (one loaded model): hooked and patched once.
    shared: bool = False

    @contextlib.contextmanager
    def opened(self, evaluated: bool, model: Any = None, held: Any = None) -> Iterator["DualModel"]:
        """This spec with the negative model's network held (loaded, patched) for the run, when the run
        ``evaluated`` its negative side (cfg other than 1, or a CFGOverride that may set one); otherwise
        it is not held, as ComfyUI does not load it onto the device. ``model``, ``held``: the guider's
        model and its network, already held with its LoRAs: where the negative network is that module,
        it is not patched a second time and the two MODELs must agree (:func:`check_shared`)."""
        if not evaluated:
            yield self
            return
        with self.model_negative.unet_beside(held) as (network, shared):
            if shared and model is not None:
                check_shared(model, self.model_negative)
            yield dataclasses.replace(self, network=network, shared=shared)

    def apart(self) -> tuple:
        """(network, family) of the negative network for the loop to hook with the guider's model's network
        patches (:data:`NETWORK_PATCHES`, as ComfyUI runs both passes with its options); none when it is
        not held or is the positive network itself (hooked already)."""
        if self.network is None or self.shared:
            return ()
        return ((self.network, self.model_negative.family),)

    def denoiser(self, network: Any, family: "Family", *, positive: Any, negative: Any, cfg: float,
                 cfg_rescale: float = 0.0, pag_scale: float = 0.0, guidance: tuple = (),
                 **common: Any) -> "DualModelDenoiser":
        """The loop's denoiser: the model's CFG patches (``cfg_rescale``, ``pag_scale``, ``guidance``: the
        guider's model's, as ComfyUI reads its guider's model_options) on the two models' CFG."""
        patched = bool(cfg_rescale or pag_scale or guidance)
        check_patches(guidance, patched, evaluated=self.network is not None)
        if self.network is None and float(cfg) != 1.0:  # sampled without opened(True)
            raise ConditioningError("DualModelGuider's negative model is not loaded (run it through "
                                    "SamplerCustomAdvanced)", "model_negative")
        patches = dict(cfg_rescale=cfg_rescale, pag_scale=pag_scale, guidance=guidance)
        return DualModelDenoiser(self, network, family, positive, negative, float(cfg), common, patches)


#: The patches ComfyUI's DualModelGuider reads from its guider's model (model_options): compared on model_negative.
#: The last four act on the sampling of both sides at once (or are refused with this guider), not on one network.
GUIDER_PATCHES = ("cfg_rescale", "pag_scale", "guidance", "perp_neg", "cfg_overrides",
                  "step_cache", "differential_diffusion", "self_attention", "skip_layers")
#: The patches that hook a network while sampling runs, by the node that sets them: model's hook both
#: networks (:meth:`DualModel.apart`), model_negative's are not used. model_control is the model's own
#: ControlNet, which each side's Denoiser stacks on its conditioning.
NETWORK_PATCHES = {"freeu": "FreeU", "deep_shrink": "PatchModelAddDownscale", "hypertile": "HyperTile",
                   "tome": "TomePatchModel", "reference_kv": "FluxKVCache",
                   "blockwise": "QwenImageDiffsynthControlnet", "model_control": "QwenImageDiffsynthControlnet",
                   "rope": "ScaleROPE", "hypernetworks": "HypernetworkLoader", "style_references": "USOStyleReference",
                   "lllite": "AnimaLLLiteApply"}
#: Pre-CFG guidance rules by the node that makes them (those whose node name is not their class name).
_NODE_NAMES = {"LatentOperationCFG": "LatentApplyOperationCFG"}


def check_patches(guidance: tuple, patched: bool, *, evaluated: bool) -> None:
    """ConditioningError (naming ``model``) for a CFG patch that ComfyUI's DualModelGuider never applies:
    a pre-CFG guidance rule (its predict_noise calls the CFG function, never the pre-CFG hooks), or any
    patch (``patched``) on a run whose negative side is not ``evaluated`` (cfg 1 without a CFGOverride:
    ComfyUI returns the positive prediction with no CFG function at all)."""
    pre = [_NODE_NAMES.get(type(rule).__name__, type(rule).__name__) for rule in guidance if rule.stage == "pre"]
    if pre:
        raise ConditioningError(f"{', '.join(pre)}: a pre-CFG patch (it rewrites the two predictions before "
                                "they are combined), which ComfyUI's DualModelGuider never runs: use CFGGuider, "
                                "or drop the patch from the model", "model")
    if patched and not evaluated:
        raise ConditioningError("RescaleCFG, perturbed-attention guidance and the guidance rules act on "
                                "DualModelGuider's CFG, which it skips at cfg 1 (as ComfyUI's does): set cfg, "
                                "or drop the patch from the model", "model")


def check_guider(model: Any, model_negative: Any, cfg: float) -> None:
    """DualModelGuider's patches, checked when the guider is made: ConditioningError naming the input for
    what ComfyUI's would silently leave out (:func:`check_patches`; the deprecated PerpNeg's CFG function,
    which Kiln's guiders cannot stack with a second model; patches on ``model_negative``, whose
    model_options ComfyUI's guider never reads: the positive ``model``'s guide both sides)."""
    patches = model.patches
    if patches.perp_neg is not None:
        raise ConditioningError("the deprecated PerpNeg patch replaces CFG with its own guider, not "
                                "DualModelGuider's: use PerpNegGuider, or drop the patch from the model", "model")
    patched = bool(patches.cfg_rescale or patches.pag_scale or patches.guidance)
    check_patches(patches.guidance, patched, evaluated=float(cfg) != 1.0 or bool(patches.cfg_overrides))
    unpatched = type(patches)()
    theirs = model_negative.patches
    if any(getattr(theirs, name) not in (getattr(patches, name), getattr(unpatched, name)) for name in GUIDER_PATCHES):
        raise ConditioningError("model_negative carries guidance patches (RescaleCFG, PAG, the CFG rules, "
                                "CFGOverride, a step cache, DifferentialDiffusion, SAG, skip-layer guidance) "
                                "that model does not: DualModelGuider guides both sides with "
                                "model's, as ComfyUI's reads only its model's options; patch model instead",
                                "model_negative")


def notes(model: Any, model_negative: Any) -> list[str]:
    """One line per network patch (:data:`NETWORK_PATCHES`) that ``model_negative`` carries and ``model``
    does not: it is not used (ComfyUI's guider runs both passes with ``model``'s options)."""
    mine, theirs, unpatched = model.patches, model_negative.patches, type(model.patches)()
    found = {node for name, node in NETWORK_PATCHES.items()
             if getattr(theirs, name) not in (getattr(mine, name), getattr(unpatched, name))}
    return [f"{node} on model_negative is not used: DualModelGuider runs both networks with model's patches, "
            "as ComfyUI's does; put it on model to apply it to both passes" for node in sorted(found)]


def check_shared(model: Any, model_negative: Any) -> None:
    """ConditioningError (naming ``model_negative``) when the two MODELs are one loaded network with other
    LoRAs or attention multipliers: the module carries one set of weights at a time, so one side would
    silently run the other's."""
    if len(model.loras) == len(model_negative.loras) and all(a is b for a, b in zip(model.loras, model_negative.loras)):
        return
    raise ConditioningError("model_negative is the same loaded network as model, with other LoRAs or attention "
                            "multipliers: one network cannot carry two sets of weights in one step. Connect the "
                            "same MODEL to both inputs (or use CFGGuider), or load a different model as "
                            "model_negative", "model_negative")


class DualModelDenoiser:
    """CFG over two conditional-only Denoisers on two networks, with the surface the sampling loop uses
    (``model_output``, ``last_uncond``, a settable ``cfg``).

    As ComfyUI's Guider_DualModel hands its two predictions to the CFG function of the guider's model:
    the combination step is the positive Denoiser's own (:meth:`Denoiser.combined`), so RescaleCFG, the
    guidance rules and PAG are the ones CFGGuider applies, seeing the negative model's prediction as
    the unconditional one; PAG's perturbed pass runs on the positive model with the positive prompt.
    At cfg 1 (a CFGOverride window) the positive prediction alone, with no patch, as ComfyUI returns it."""

    def __init__(self, spec: DualModel, network: Any, family: "Family", positive: Any, negative: Any,
                 cfg: float, common: dict, patches: dict | None = None) -> None:
        self.cfg = cfg
        #: CFGOverride may move cfg anywhere when the negative model is held (DualModel.opened)
        self.guided = spec.network is not None
        self.cond = Denoiser(network, family, positive=positive, negative=None, cfg=1.0,
                             names=("positive", "positive"), **(patches or {}), **common)
        self.uncond = None if spec.network is None else Denoiser(
            spec.network, spec.model_negative.family, positive=negative, negative=None, cfg=1.0,
            names=("negative", "negative"), **common)
        self.last_uncond: "torch.Tensor | None" = None

    def model_output(self, model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        cond, _ = self.cond.sides(model_in, t)
        if self.cfg == 1.0:
            self.last_uncond = cond
            return cond
        self.last_uncond = self.uncond.model_output(model_in, t)
        return self.cond.combined(cond, self.last_uncond, model_in, t, self.cfg)


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
