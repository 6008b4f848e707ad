"""ComfyUI's model patches that change how classifier-free guidance combines the conditional
and unconditional predictions (CFGZeroStar, APG, CFGNorm, TCFG, Mahiro, RenormCFG, Epsilon
Scaling, FreSca, LatentApplyOperationCFG), and the PerpNegGuider.

Each returns a new MODEL handle with one more rule on ``patches.guidance`` (the handle it was
given samples as before); the denoiser runs them (nodes.families.guidance_rules). They are
stated on clean-latent predictions, so they hold for epsilon, v-prediction and flow models
alike: FLUX is accepted (CFGZeroStar was made for flow models), though at FLUX's usual cfg 1
only the rules that act on the conditional side alone change anything.
"""
from __future__ import annotations

import dataclasses

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.families import guidance_rules as rules


def _check_model(model) -> None:
    from nodes.handles import ModelHandle

    if not isinstance(model, ModelHandle):
        raise NodeError(f"model must be a MODEL, got {type(model).__name__}", "model")


def _with_rule(model, rule: rules.Rule):
    """A new handle with ``rule`` after the ones already applied. A rule that replaces the
    CFG combination also replaces RescaleCFG's, as ComfyUI keeps one CFG function."""
    _check_model(model)
    if rule.changes_nothing():  # the identity: sample exactly as the given handle does
        return dataclasses.replace(model)
    changes: dict = {"guidance": model.patches.guidance + (rule,)}
    if rule.stage == "combine":
        changes.update(cfg_rescale=0.0, perp_neg=None)
    return dataclasses.replace(model, patches=dataclasses.replace(model.patches, **changes))


def _in_range(name: str, value: float, low: float, high: float) -> float:
    value = float(value)
    if not low <= value <= high:
        raise NodeError(f"{name} must be between {low:g} and {high:g}, got {value:g}", name)
    return value


@define_node("CFGZeroStar", category="advanced/guidance", inputs=[Input("model", T.MODEL)],
             outputs=[Output("patched_model", T.MODEL)])
def cfg_zero_star(ctx, model):
    """CFG-Zero*: the unconditional prediction rescaled by its best least-squares match to the
    conditional one before guiding, which steadies flow models' early steps."""
    return (_with_rule(model, rules.CFGZeroStar()),)


@define_node("APG", category="sampling/custom_sampling", display_name="Adaptive Projected Guidance",
             inputs=[Input("model", T.MODEL),
                     Input("eta", T.FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01,
                           tooltip="Scale of the guidance part along the conditional prediction (1: as CFG)."),
                     Input("norm_threshold", T.FLOAT, default=5.0, min=0.0, max=50.0, step=0.1,
                           tooltip="Longest the guidance vector may be (0: no cap)."),
                     Input("momentum", T.FLOAT, default=0.0, min=-5.0, max=1.0, step=0.01,
                           tooltip="Weight of earlier steps' guidance in a running sum (0: none).")],
             outputs=[Output("MODEL", T.MODEL)])
def apg(ctx, model, eta: float, norm_threshold: float, momentum: float):
    """Adaptive projected guidance: high cfg without oversaturation, by damping the part of the
    guidance that points along the conditional prediction and capping its length."""
    rule = rules.APG(_in_range("eta", eta, -10.0, 10.0), _in_range("norm_threshold", norm_threshold, 0.0, 50.0),
                     _in_range("momentum", momentum, -5.0, 1.0))
    return (_with_rule(model, rule),)


@define_node("CFGNorm", category="advanced/guidance",
             inputs=[Input("model", T.MODEL),
                     Input("strength", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("patched_model", T.MODEL)])
def cfg_norm(ctx, model, strength: float):
    """Guidance may turn each pixel's prediction but not lengthen it past the conditional one's;
    ``strength`` then scales the result (experimental in ComfyUI)."""
    return (_with_rule(model, rules.CFGNorm(_in_range("strength", strength, 0.0, 100.0))),)


@define_node("TCFG", category="advanced/guidance", display_name="Tangential Damping CFG",
             inputs=[Input("model", T.MODEL)], outputs=[Output("patched_model", T.MODEL)])
def tcfg(ctx, model):
    """Tangential-damping CFG: the negative prediction keeps only what lies along the shared
    direction of both predictions, which refines it towards the positive one."""
    return (_with_rule(model, rules.TCFG()),)


@define_node("Mahiro", category="_for_testing",
             display_name="Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)",
             inputs=[Input("model", T.MODEL)], outputs=[Output("patched_model", T.MODEL)])
def mahiro(ctx, model):
    """Guidance that leans on the positive prompt's own direction rather than its difference
    from the negative one."""
    return (_with_rule(model, rules.Mahiro()),)


@define_node("RenormCFG", category="advanced/model",
             inputs=[Input("model", T.MODEL),
                     Input("cfg_trunc", T.FLOAT, default=100.0, min=0.0, max=100.0, step=0.01),
                     Input("renorm_cfg", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("MODEL", T.MODEL)])
def renorm_cfg(ctx, model, cfg_trunc: float, renorm_cfg: float):
    """Lumina 2's guidance: CFG capped at ``renorm_cfg`` times the conditional prediction's
    length (0: uncapped), and no guidance at noise levels from ``cfg_trunc`` up."""
    rule = rules.RenormCFG(_in_range("cfg_trunc", cfg_trunc, 0.0, 100.0),
                           _in_range("renorm_cfg", renorm_cfg, 0.0, 100.0))
    return (_with_rule(model, rule),)


@define_node("Epsilon Scaling", category="model_patches/unet",
             inputs=[Input("model", T.MODEL),
                     Input("scaling_factor", T.FLOAT, default=1.005, min=0.5, max=1.5, step=0.001,
                           extra={"display": "number"})],
             outputs=[Output("MODEL", T.MODEL)])
def epsilon_scaling(ctx, model, scaling_factor: float):
    """Exposure-bias correction: after guidance (ComfyUI's post-CFG stage, so at cfg 1 too) the
    predicted noise is divided by ``scaling_factor``; 1 changes nothing."""
    return (_with_rule(model, rules.EpsilonScaling(_in_range("scaling_factor", scaling_factor, 0.5, 1.5))),)


@define_node("FreSca", category="_for_testing", display_name="FreSca",
             inputs=[Input("model", T.MODEL),
                     Input("scale_low", T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.01,
                           tooltip="Factor for the guidance's low frequencies (its layout)."),
                     Input("scale_high", T.FLOAT, default=1.25, min=0.0, max=10.0, step=0.01,
                           tooltip="Factor for the guidance's high frequencies (its detail)."),
                     Input("freq_cutoff", T.INT, default=20, min=1, max=10000, step=1,
                           tooltip="Frequency bins each way from the centre that count as low.")],
             outputs=[Output("MODEL", T.MODEL)])
def fresca(ctx, model, scale_low: float, scale_high: float, freq_cutoff: int):
    """Frequency-dependent guidance: the difference between the two prompts' predictions
    scaled band by band before CFG (ComfyUI's pre-CFG stage; needs a negative side, so it
    does nothing at cfg 1)."""
    rule = rules.FreSca(_in_range("scale_low", scale_low, 0.0, 10.0), _in_range("scale_high", scale_high, 0.0, 10.0),
                        int(_in_range("freq_cutoff", freq_cutoff, 1, 10000)))
    return (_with_rule(model, rule),)


@define_node("LatentApplyOperationCFG", category="latent/advanced/operations",
             inputs=[Input("model", T.MODEL), Input("operation", T.LATENT_OPERATION)],
             outputs=[Output("MODEL", T.MODEL)])
def latent_apply_operation_cfg(ctx, model, operation):
    """A LATENT_OPERATION applied to the guidance (cond - uncond) at every step, before CFG
    (ComfyUI's pre-CFG stage): e.g. the Reinhard tonemap to tame a high cfg."""
    from nodes.latent_operations import check_operation

    _check_model(model)
    return (_with_rule(model, rules.LatentOperationCFG(check_operation(operation))),)


@define_node("PerpNegGuider", category="_for_testing",
             inputs=[Input("model", T.MODEL), Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING),
                     Input("empty_conditioning", T.CONDITIONING),
                     Input("cfg", T.FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                     Input("neg_scale", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("GUIDER", T.GUIDER)])
def perp_neg_guider(ctx, model, positive, negative, empty_conditioning, cfg: float, neg_scale: float):
    """Perp-Neg: guidance measured from the empty prompt, where the negative prompt only pushes
    along what it does not share with the positive one (nodes.families.perp_neg)."""
    from nodes.families import conditioning as cond_rules
    from nodes.families.base import ConditioningError
    from nodes.families.perp_neg import PerpNeg
    from nodes.samplers.custom import Guider

    _check_model(model)
    for name, cond in (("positive", positive), ("negative", negative), ("empty_conditioning", empty_conditioning)):
        try:
            cond_rules.entries(cond, name)
        except ConditioningError as exc:
            raise NodeError(str(exc), exc.input_name) from None
    cfg, neg_scale = _in_range("cfg", cfg, 0.0, 100.0), _in_range("neg_scale", neg_scale, 0.0, 100.0)
    empty = [[item[0], {**(item[1] or {}), "prompt_type": "negative"}] for item in empty_conditioning]
    return (Guider(model, positive, negative, cfg, dual=PerpNeg(empty, neg_scale)),)


@define_node("PerpNeg", category="_for_testing", display_name="Perp-Neg (DEPRECATED by PerpNegGuider)",
             inputs=[Input("model", T.MODEL), Input("empty_conditioning", T.CONDITIONING),
                     Input("neg_scale", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("MODEL", T.MODEL)])
def perp_neg(ctx, model, empty_conditioning, neg_scale: float):
    """Perp-Neg as a model patch (ComfyUI keeps it for old workflows; PerpNegGuider replaces it):
    KSampler's positive and negative are combined as PerpNegGuider combines them."""
    from nodes.families import conditioning as cond_rules
    from nodes.families.base import ConditioningError
    from nodes.families.perp_neg import PerpNeg

    _check_model(model)
    try:
        cond_rules.entries(empty_conditioning, "empty_conditioning")
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    empty = [[item[0], {**(item[1] or {}), "prompt_type": "negative"}] for item in empty_conditioning]
    spec = PerpNeg(empty, _in_range("neg_scale", neg_scale, 0.0, 100.0), always_guided=False,
                   middle_input="model")  # at KSampler the patch arrives through its model input
    # ComfyUI keeps one CFG function: this one replaces RescaleCFG's and RenormCFG's
    kept = tuple(rule for rule in model.patches.guidance if rule.stage != "combine")
    patches = dataclasses.replace(model.patches, perp_neg=spec, cfg_rescale=0.0, guidance=kept)
    return (dataclasses.replace(model, patches=patches),)
