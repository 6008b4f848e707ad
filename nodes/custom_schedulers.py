"""ComfyUI's other sigma-list nodes: the schedulers beyond BasicScheduler and KarrasScheduler,
and the nodes that edit a list, with ComfyUI's names, inputs and defaults.

The formula-only and table schedulers (Exponential, Polyexponential, Laplace, VP,
AlignYourSteps, OptimalSteps; GITS is in nodes.gits_scheduler) need no model; SDTurbo and
BetaSampling pick noise levels of the model's own training schedule, so they run for the
DDPM-trained families (a flow model's levels are flow times, and those nodes have no flow
form in ComfyUI's sense either: they are refused naming ``model``). Every list is float32
and descending; like ComfyUI's, Laplace ends at sigma_min instead of 0 (sampling then stops
with that much noise left, as in ComfyUI).
"""
from __future__ import annotations

import math
import re

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

_SIGMA_MAX, _SIGMA_MIN = 14.614642, 0.0291675  # SD's training range, ComfyUI's defaults
#: SamplingPercentToSigma's level for "before sampling starts" (ComfyUI's number).
ABOVE_EVERY_LEVEL = 999999999.9

#: Align Your Steps' published 10-step noise levels (NVIDIA, arXiv 2404.14507), per model type.
AYS_LEVELS: dict[str, tuple[float, ...]] = {
    "SD1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "SDXL": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "SVD": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}

#: Optimal Steps' published flow-time levels (Pei et al. 2025, "Optimal Stepsize for Diffusion
#: Sampling"; ComfyUI's table): 10 steps for FLUX, 20 for Wan, 40 for Chroma.
OPTIMAL_STEPS_LEVELS: dict[str, tuple[float, ...]] = {
    "FLUX": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
    "Wan": (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946,
            0.927, 0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
    "Chroma": (0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931, 0.917,
               0.9, 0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501, 0.451,
               0.402, 0.355, 0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12, 0.101, 0.084, 0.07, 0.058,
               0.048, 0.001),
}


def range_inputs() -> list[Input]:
    """steps, sigma_max, sigma_min with ComfyUI's defaults (SD's training range)."""
    return [Input("steps", T.INT, default=20, min=1, max=10000),
            Input("sigma_max", T.FLOAT, default=_SIGMA_MAX, min=0.0, max=5000.0, step=0.01),
            Input("sigma_min", T.FLOAT, default=_SIGMA_MIN, min=0.0, max=5000.0, step=0.01)]


def check_range(sigma_max: float, sigma_min: float) -> None:
    if sigma_min <= 0:
        raise NodeError(f"sigma_min must be above 0, got {sigma_min}", "sigma_min")
    if sigma_max < sigma_min:
        raise NodeError(f"sigma_max ({sigma_max}) is below sigma_min ({sigma_min})", "sigma_max")


@define_node("ExponentialScheduler", category="sampling/schedulers", inputs=range_inputs(),
             outputs=[Output("SIGMAS", T.SIGMAS)])
def exponential_scheduler(ctx, steps: int, sigma_max: float, sigma_min: float):
    """``steps`` levels evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    return polyexponential_scheduler(ctx, steps, sigma_max, sigma_min, 1.0)


@define_node("PolyexponentialScheduler", category="sampling/schedulers",
             inputs=[*range_inputs(), Input("rho", T.FLOAT, default=1.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def polyexponential_scheduler(ctx, steps: int, sigma_max: float, sigma_min: float, rho: float):
    """log sigma runs from max to min along ramp^rho (ramp 1 -> 0): rho 1 is the exponential
    schedule (KSampler's ``exponential`` over the model's range), a larger rho spends more
    steps at low noise."""
    from nodes.samplers.schedules import polyexponential

    sigma_max, sigma_min, rho = float(sigma_max), float(sigma_min), float(rho)
    check_range(sigma_max, sigma_min)
    if rho <= 0:
        raise NodeError(f"rho must be above 0, got {rho}", "rho")
    return (polyexponential(int(steps), sigma_min, sigma_max, rho),)


@define_node("LaplaceScheduler", category="sampling/schedulers",
             inputs=[*range_inputs(), Input("mu", T.FLOAT, default=0.0, min=-10.0, max=10.0, step=0.1),
                     Input("beta", T.FLOAT, default=0.5, min=0.0, max=10.0, step=0.1)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def laplace_scheduler(ctx, steps: int, sigma_max: float, sigma_min: float, mu: float, beta: float):
    """Levels at the quantiles of a Laplace distribution of log sigma (location mu, scale beta;
    Tiankai et al. 2024), clamped to [sigma_min, sigma_max]: dense around e^mu. Without a
    final 0, as ComfyUI's."""
    import torch

    sigma_max, sigma_min = float(sigma_max), float(sigma_min)
    check_range(sigma_max, sigma_min)
    x = torch.linspace(0, 1, int(steps), dtype=torch.float64)
    offset = 0.5 - x
    log_sigma = float(mu) - float(beta) * torch.sign(offset) * torch.log(1 - 2 * offset.abs() + 1e-5)
    return (torch.exp(log_sigma).clamp(sigma_min, sigma_max).to(torch.float32),)


@define_node("VPScheduler", category="sampling/schedulers",
             inputs=[Input("steps", T.INT, default=20, min=1, max=10000),
                     Input("beta_d", T.FLOAT, default=19.9, min=0.0, max=5000.0, step=0.01),
                     Input("beta_min", T.FLOAT, default=0.1, min=0.0, max=5000.0, step=0.01),
                     Input("eps_s", T.FLOAT, default=0.001, min=0.0, max=1.0, step=0.0001)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def vp_scheduler(ctx, steps: int, beta_d: float, beta_min: float, eps_s: float):
    """The continuous variance-preserving schedule (Song et al.): t from 1 to eps_s evenly,
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), then 0."""
    import torch

    if float(eps_s) <= 0:
        raise NodeError(f"eps_s must be above 0, got {eps_s}", "eps_s")
    t = torch.linspace(1, float(eps_s), int(steps), dtype=torch.float64)
    from nodes.samplers.schedules import append_zero

    return (append_zero(torch.sqrt(torch.expm1(float(beta_d) * t ** 2 / 2 + float(beta_min) * t))),)


def log_linear(levels, count: int):
    """``count`` levels spread evenly over a descending list's positions, interpolated linearly in
    log sigma (ComfyUI's rule for stretching a published table to another step count)."""
    import numpy as np

    ascending = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, count), np.linspace(0, 1, len(ascending)), ascending))[::-1].copy()


def denoised_tail(levels, steps: int, denoise: float):
    """The SIGMAS for a table scheduler: ``levels`` holds ``steps + 1`` levels; below denoise 1 only
    the last ``round(steps * denoise)`` steps; the final level set to 0 (ComfyUI's rule, which also
    zeroes the end of a shortened list); denoise 0 gives an empty list."""
    import torch

    run = int(steps)
    if float(denoise) < 1.0:
        if float(denoise) <= 0.0:
            return torch.zeros(0)
        run = round(int(steps) * float(denoise))
    picked = torch.tensor(list(levels)[-(run + 1):], dtype=torch.float32)
    picked[-1] = 0.0
    return picked


def _table_levels(table: dict, model_type: str, steps: int):
    """The model type's published list, stretched to ``steps + 1`` levels when it has another length."""
    if model_type not in table:
        raise NodeError(f"unknown model_type {model_type!r}; choose one of {', '.join(table)}", "model_type")
    levels = table[model_type]
    return levels if len(levels) == int(steps) + 1 else log_linear(levels, int(steps) + 1)


@define_node("AlignYourStepsScheduler", category="sampling/schedulers",
             inputs=[Input("model_type", T.COMBO, default="SD1", choices=list(AYS_LEVELS)),
                     Input("steps", T.INT, default=10, min=1, max=10000),
                     Input("denoise", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def align_your_steps_scheduler(ctx, model_type: str, steps: int, denoise: float):
    """Align Your Steps' optimised levels: the published 10-step list, interpolated linearly in
    log sigma for another count; below denoise 1 the last ``round(steps * denoise)`` steps;
    the final level set to 0 (ComfyUI's rule, which also zeroes the end of a shortened list)."""
    return (denoised_tail(_table_levels(AYS_LEVELS, model_type, steps), steps, denoise),)


@define_node("OptimalStepsScheduler", category="sampling/schedulers",
             inputs=[Input("model_type", T.COMBO, choices=list(OPTIMAL_STEPS_LEVELS)),
                     Input("steps", T.INT, default=20, min=3, max=1000),
                     Input("denoise", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def optimal_steps_scheduler(ctx, model_type: str, steps: int, denoise: float):
    """Optimal Steps' searched flow-time levels for FLUX, Wan or Chroma: the published list,
    interpolated linearly in log sigma for another count; denoise and the final 0 as in
    AlignYourStepsScheduler."""
    return (denoised_tail(_table_levels(OPTIMAL_STEPS_LEVELS, model_type, steps), steps, denoise),)


def _discrete_levels(model):
    """The 1000-level table of a DDPM-trained model's training schedule, or of a continuous-EDM
    model's range (even in log sigma, ComfyUI's table for it); flow models are refused naming ``model``."""
    from nodes.samplers.model_sampling import FlowSampling, for_model

    sampling = for_model(model)
    if isinstance(sampling, FlowSampling):
        raise NodeError("this scheduler picks levels of a DDPM-trained model's schedule; a flow model "
                        "(FLUX) has none: use BasicScheduler", "model")
    return sampling.schedule


@define_node("SDTurboScheduler", category="sampling/schedulers",
             inputs=[Input("model", T.MODEL), Input("steps", T.INT, default=1, min=1, max=10),
                     Input("denoise", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def sd_turbo_scheduler(ctx, model, steps: int, denoise: float):
    """SD-Turbo's levels: training timesteps 999, 899, ..., 99, from ``10 - int(10 * denoise)``
    on, ``steps`` of them, then 0."""
    import torch

    schedule = _discrete_levels(model)
    start = 10 - int(10 * float(denoise))
    timesteps = torch.arange(999, 0, -100)[start:start + int(steps)]
    from nodes.samplers.schedules import append_zero

    return (append_zero(schedule.sigmas[timesteps]),)


@define_node("BetaSamplingScheduler", category="sampling/schedulers",
             inputs=[Input("model", T.MODEL), Input("steps", T.INT, default=20, min=1, max=10000),
                     Input("alpha", T.FLOAT, default=0.6, min=0.0, max=50.0, step=0.01),
                     Input("beta", T.FLOAT, default=0.6, min=0.0, max=50.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def beta_sampling_scheduler(ctx, model, steps: int, alpha: float, beta: float):
    """The ``beta`` schedule with its shape chosen: training levels at the quantiles of
    Beta(alpha, beta) (0.6, 0.6 is KSampler's ``beta``). A flow model's levels are ComfyUI's table of
    them, its shifted flow times (nodes.samplers.flow.FlowSchedule.level_table), as ComfyUI picks them."""
    from types import SimpleNamespace

    from nodes.samplers.model_sampling import FlowSampling, for_model
    from nodes.samplers.schedules import beta_levels

    for name, value in (("alpha", alpha), ("beta", beta)):
        if float(value) <= 0:
            raise NodeError(f"{name} must be above 0, got {value}", name)
    sampling = for_model(model)
    levels = SimpleNamespace(sigmas=sampling.schedule.level_table()) if isinstance(sampling, FlowSampling) \
        else _discrete_levels(model)
    return (beta_levels(levels, int(steps), float(alpha), float(beta)),)


# -- editing a list -----------------------------------------------------------------------------

@define_node("SetFirstSigma", category="sampling/sigmas",
             inputs=[Input("sigmas", T.SIGMAS), Input("sigma", T.FLOAT, default=136.0, min=0.0, max=20000.0,
                                                          step=0.001)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def set_first_sigma(ctx, sigmas, sigma: float):
    """The list with its first level replaced (the input list is left as it was)."""
    from nodes.samplers.custom import check_sigmas

    out = check_sigmas(sigmas).clone()
    if len(out) == 0:
        raise NodeError("the list is empty: there is no first level to set", "sigmas")
    out[0] = float(sigma)
    return (out,)


SPACINGS = {"linear": lambda x: x, "cosine": lambda x: math.sin(x * math.pi / 2),
            "sine": lambda x: 1 - math.cos(x * math.pi / 2)}


@define_node("ExtendIntermediateSigmas", category="sampling/sigmas",
             inputs=[Input("sigmas", T.SIGMAS), Input("steps", T.INT, default=2, min=1, max=100),
                     Input("start_at_sigma", T.FLOAT, default=-1.0, min=-1.0, max=20000.0, step=0.01),
                     Input("end_at_sigma", T.FLOAT, default=12.0, min=0.0, max=20000.0, step=0.01),
                     Input("spacing", T.COMBO, default="linear", choices=list(SPACINGS))],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def extend_intermediate_sigmas(ctx, sigmas, steps: int, start_at_sigma: float, end_at_sigma: float, spacing: str):
    """Split every step that starts between end_at_sigma and start_at_sigma (-1: no upper
    bound) into ``steps`` steps, the new levels placed by ``spacing`` between its ends."""
    import torch

    from nodes.samplers.custom import check_sigmas

    if spacing not in SPACINGS:
        raise NodeError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}", "spacing")
    levels = check_sigmas(sigmas).tolist()
    top = math.inf if float(start_at_sigma) < 0 else float(start_at_sigma)
    shape = SPACINGS[spacing]
    inner = [shape(k / int(steps)) for k in range(1, int(steps))]
    out: list[float] = []
    for current, following in zip(levels, levels[1:]):
        out.append(current)
        if float(end_at_sigma) <= current <= top:
            out.extend(current + f * (following - current) for f in inner)
    out.extend(levels[-1:])
    return (torch.tensor(out, dtype=torch.float32),)


@define_node("SamplingPercentToSigma", category="sampling/sigmas",
             inputs=[Input("model", T.MODEL),
                     Input("sampling_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.0001),
                     Input("return_actual_sigma", T.BOOLEAN, default=False)],
             outputs=[Output("sigma_value", T.FLOAT)])
def sampling_percent_to_sigma(ctx, model, sampling_percent: float, return_actual_sigma: bool):
    """The model's noise level at a fraction of sampling (0: the start, 1: the end), the rule
    timestep ranges use. At exactly 0 that rule lies above every level (ComfyUI's number for
    it, 999999999.9, since a FLOAT cannot carry inf) and at 1 it is 0, so a range check
    includes the ends; ``return_actual_sigma`` gives the training range's ends instead."""
    from nodes.samplers.model_sampling import for_model
    from nodes.samplers.schedules import percent_to_sigma

    sampling = for_model(model)
    percent = float(sampling_percent)
    if return_actual_sigma and percent in (0.0, 1.0):
        return (float(sampling.sigma_max if percent == 0.0 else sampling.sigma_min),)
    sigma = percent_to_sigma(sampling.schedule, percent)
    return (ABOVE_EVERY_LEVEL if math.isinf(sigma) else sigma,)


#: A number as ComfyUI's ManualSigmas finds one in its text: an optional sign, digits and
#: dots, ending in a digit ("1." gives 1, "1e-3" gives 1 and -3, as there).
_SIGMA_TOKEN = re.compile(r"[+-]?\d*\.*\d+")


def parse_sigma_text(text: str) -> list[float]:
    """Every number in ``text``, in order; a NodeError naming ``sigmas`` when one is malformed
    (two dots) or there is none."""
    values = []
    for token in _SIGMA_TOKEN.findall(text):
        try:
            values.append(float(token))
        except ValueError:
            raise NodeError(f"'{token}' is not a number", "sigmas") from None
    if not values:
        raise NodeError(f"no numbers in {text!r}: write the levels as e.g. '1.0, 0.5, 0.0'", "sigmas")
    return values


@define_node("ManualSigmas", category="sampling/sigmas",
             inputs=[Input("sigmas", T.STRING, default="1, 0.5")],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def manual_sigmas(ctx, sigmas: str):
    """A noise-level list typed by hand (a distilled model's few published levels): every number
    in the text, in order, separated by commas or spaces."""
    import torch

    return (torch.tensor(parse_sigma_text(sigmas), dtype=torch.float32),)
