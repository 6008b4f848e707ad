"""ComfyUI's nodes for two-model guidance and Ideogram 4's schedule, with ComfyUI's names, inputs and defaults:
DualModelGuider and CFGOverride (``comfy_extras/nodes_custom_sampler.py``; the rules in
nodes.families.dual_model) and Ideogram4Scheduler (its logit-normal sigmas, :func:`ideogram4_sigmas`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

#: Ideogram's logSNR clamp of the flow time (the pipeline's and ComfyUI's).
LOGSNR_MIN, LOGSNR_MAX = -15.0, 18.0


def _model(value: Any, input_name: str) -> Any:
    from nodes.handles import ModelHandle

    if not isinstance(value, ModelHandle):
        raise NodeError(f"expected a MODEL, got {type(value).__name__}", input_name)
    return value


def _conditioning(value: Any, input_name: str) -> list:
    from nodes.families import conditioning as cond_rules
    from nodes.families.base import ConditioningError

    try:
        cond_rules.entries(value, input_name)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    return value


def _text_free(positive: list) -> list:
    """The unconditional side ComfyUI runs when ``negative`` is left unconnected: no text. Kiln's
    transformers read an all-zero conditioning as that (nodes.families.ideogram4), so zeros as wide as
    the positive's, one token long."""
    import torch

    width = positive[0][0].shape[-1]
    return [[torch.zeros(1, 1, width), {}]]


@define_node("DualModelGuider", category="sampling/guiders", display_name="Dual Model CFG Guider",
             inputs=[Input("model", T.MODEL, tooltip="Model used for the positive (conditional) pass."),
                     Input("model_negative", T.MODEL, optional=True,
                           tooltip="Model used for the negative (unconditional) pass. Use the same model for "
                                   "ordinary CFG."),
                     Input("positive", T.CONDITIONING),
                     Input("cfg", T.FLOAT, default=4.0, min=0.0, max=100.0, step=0.1, round=0.01),
                     Input("negative", T.CONDITIONING, optional=True,
                           tooltip="Negative conditioning run on the negative model. Leave unconnected for a "
                                   "text-free (image-only) unconditional pass.")],
             outputs=[Output("GUIDER", T.GUIDER)])
def dual_model_guider(ctx, model, positive, cfg: float, model_negative=None, negative=None):
    """CFG with the positive prompt on ``model`` and the negative on ``model_negative`` (Ideogram 4's
    unconditional transformer); without ``model_negative`` ordinary CFG on ``model``."""
    from nodes.families.base import ConditioningError
    from nodes.families.dual_model import DualModel, check_guider, notes
    from nodes.samplers.custom import Guider

    model = _model(model, "model")
    positive = _conditioning(positive, "positive")
    negative = _text_free(positive) if negative is None else _conditioning(negative, "negative")
    if model_negative is None:
        return (Guider(model, positive, negative, float(cfg)),)
    model_negative = _model(model_negative, "model_negative")
    if model_negative.latent.channels != model.latent.channels:
        raise NodeError(f"model_negative works on {model_negative.latent.channels}-channel latents, model on "
                        f"{model.latent.channels}: the two must share a latent space", "model_negative")
    try:
        check_guider(model, model_negative, float(cfg))
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    for note in notes(model, model_negative):
        ctx.message(note)
    return (Guider(model, positive, negative, float(cfg), dual=DualModel(model_negative)),)


@define_node("CFGOverride", category="sampling/guiders", display_name="CFG Override",
             description="Override cfg to a fixed value over a [start, end] percent (sigma) range. "
                         "With multiple overrides, the one nearest the sampler wins on overlap.",
             inputs=[Input("model", T.MODEL),
                     Input("cfg", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.1, round=0.01),
                     Input("start_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
                     Input("end_percent", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.001)],
             outputs=[Output("MODEL", T.MODEL)])
def cfg_override(ctx, model, cfg: float, start_percent: float, end_percent: float):
    """The model with the guider's cfg set to ``cfg`` at the steps whose noise level lies in the window."""
    from nodes.families.dual_model import CFGWindow

    model = _model(model, "model")
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= float(value) <= 1.0:
            raise NodeError(f"{name} must be between 0 and 1, got {value}", name)
    window = CFGWindow(float(cfg), float(start_percent), float(end_percent))
    patches = dataclasses.replace(model.patches, cfg_overrides=(*model.patches.cfg_overrides, window))
    return (dataclasses.replace(model, patches=patches),)


def ideogram4_sigmas(steps: int, width: int, height: int, mu: float, std: float) -> "Any":
    """Ideogram 4's descending sigmas (steps + 1, ending at 0): the logit-normal quantiles of an even grid,
    the mean shifted by half the log of the pixel count over 512x512, the flow time clamped to the
    logSNR range (Ideogram4Pipeline's ``_logit_normal_sigmas`` with its terminal 0)."""
    import torch

    mean = mu + 0.5 * math.log((width * height) / (512 * 512))
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    time = 1.0 - torch.special.expit(mean + std * torch.special.ndtri(grid))
    time = time.clamp(1.0 / (1.0 + math.exp(0.5 * LOGSNR_MAX)), 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MIN)))
    sigmas = (1.0 - time).flip(0)
    sigmas[-1] = 0.0
    return sigmas.to(torch.float32)


@define_node("Ideogram4Scheduler", category="sampling/schedulers", display_name="Ideogram 4 Scheduler",
             inputs=[Input("steps", T.INT, default=20, min=1, max=200),
                     Input("width", T.INT, default=1024, min=256, max=8192, step=16),
                     Input("height", T.INT, default=1024, min=256, max=8192, step=16),
                     Input("mu", T.FLOAT, default=0.0, min=-10.0, max=10.0, step=0.05),
                     Input("std", T.FLOAT, default=1.75, min=0.1, max=5.0, step=0.05)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def ideogram4_scheduler(ctx, steps: int, width: int, height: int, mu: float, std: float):
    """Ideogram 4's sigmas for an image of ``width`` x ``height`` (:func:`ideogram4_sigmas`)."""
    for name, value, low in (("steps", steps, 1), ("width", width, 1), ("height", height, 1)):
        if int(value) < low:
            raise NodeError(f"{name} must be at least {low}, got {value}", name)
    if not float(std) > 0.0:
        raise NodeError(f"std must be positive, got {std}", "std")
    return (ideogram4_sigmas(int(steps), int(width), int(height), float(mu), float(std)),)
