"""Sigma schedules: which noise levels a sampler visits.

Two families of schedules live here, because Kiln answers to two conventions:

* **diffusers' grid** (AddNoise strength, text-to-image): the schedule a diffusers
  scheduler builds from the checkpoint's ``scheduler_config`` (its
  ``timestep_spacing``, ``steps_offset``, Karras/exponential flags).
  :func:`diffusers_sigmas` asks diffusers' own Euler scheduler for that list, so
  the sigma-space samplers Kiln runs itself see exactly the grid diffusers' k-samplers do.
* **ComfyUI's grid** (``KSampler.denoise`` < 1 without AddNoise): ComfyUI's
  ``normal``/``karras``/``exponential``/``simple``/``sgm_uniform``/``ddim_uniform``/
  ``beta``/``linear_quadratic``/``kl_optimal`` schedules over the model's training
  sigmas, and its ``denoise`` rule (see :func:`comfy_sigmas`). The four last ones
  follow ComfyUI's published formulas (``comfy/samplers.py``); ``beta`` is also
  diffusers' ``use_beta_sigmas`` (alpha = beta = 0.6), which its schedulers use on
  their own grid.

Every list is descending and ends with 0.0, one entry more than the steps it drives.
"""
from __future__ import annotations

import json
import math
import threading
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

#: diffusers config switches that turn a scheduler's own grid into each schedule.
#: ``simple`` has no diffusers counterpart and is always computed here.
DIFFUSERS_FLAGS: dict[str, dict[str, Any]] = {
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "beta": {"use_beta_sigmas": True},
}


def training_sigmas(config: Mapping[str, Any]) -> "torch.Tensor":
    """sigma(t) = sqrt((1 - alphas_cumprod) / alphas_cumprod) for t = 0..T-1, float32.

    The betas come from diffusers (built from the checkpoint's scheduler config), so
    every beta schedule diffusers knows is covered without re-deriving it here. Each
    sampler and schedule node asks; building the scheduler takes milliseconds, so the
    sigmas of the last few configs are kept (a copy is returned: callers own what they get).
    """
    import torch
    from diffusers import EulerDiscreteScheduler

    key = json.dumps(dict(config), sort_keys=True, default=repr)
    with _TRAINING_LOCK:
        sigmas = _TRAINING_SIGMAS.pop(key, None)
    if sigmas is None:
        ac = EulerDiscreteScheduler.from_config(dict(config)).alphas_cumprod.to(torch.float64)
        sigmas = ((1 - ac) / ac).sqrt().to(torch.float32)
    with _TRAINING_LOCK:
        _TRAINING_SIGMAS[key] = sigmas  # most recently used last
        while len(_TRAINING_SIGMAS) > 16:
            del _TRAINING_SIGMAS[next(iter(_TRAINING_SIGMAS))]
    return sigmas.clone()


#: training sigmas by their scheduler config's JSON (see :func:`training_sigmas`); lanes share them
_TRAINING_SIGMAS: dict[str, "torch.Tensor"] = {}
_TRAINING_LOCK = threading.Lock()


class VarianceExploding:
    """What the steppers read of a schedule whose state is x = x0 + sigma * eps (the discrete
    families' k-diffusion view and continuous-EDM models alike; flow models differ)."""

    @staticmethod
    def alpha(sigma: float) -> float:
        """The clean latent's weight in the state at ``sigma`` (x = alpha x0 + sigma eps): 1 here."""
        return 1.0

    @staticmethod
    def half_log_snr(sigma: float) -> float:
        """log(alpha / sigma), the time exponential integrators step in."""
        return -math.log(sigma)

    @staticmethod
    def sigma_at_half_log_snr(value: float) -> float:
        return math.exp(-value)


class TrainingSchedule(VarianceExploding):
    """sigma <-> timestep over the training sigmas, interpolating in log sigma.

    This is the continuous-time view both ComfyUI (``ModelSamplingDiscrete``) and
    diffusers' k-schedulers (``_sigma_to_t``) take of a discrete 1000-step model.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.sigmas = training_sigmas(config)
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t: "torch.Tensor | float") -> "torch.Tensor":
        import torch

        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def timestep(self, sigma: "torch.Tensor | float") -> "torch.Tensor":
        import torch

        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
        dists = log_sigma - self.log_sigmas[:, None]
        lo_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.log_sigmas) - 2)
        hi_idx = lo_idx + 1
        lo, hi = self.log_sigmas[lo_idx], self.log_sigmas[hi_idx]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * lo_idx + w * hi_idx).view(torch.as_tensor(sigma).shape)

    @staticmethod
    def model_input(sample: "torch.Tensor", sigma: float) -> "torch.Tensor":
        """What the network sees of a state x = x0 + sigma * eps: the variance-preserving
        x / sqrt(sigma^2 + 1) it was trained on."""
        return sample / ((sigma ** 2 + 1) ** 0.5)


def percent_to_sigma(schedule: Any, percent: float) -> float:
    """ComfyUI's fraction of sampling -> noise level (timestep ranges on conditioning): the
    level at training timestep (1 - percent) * T; 0 lies above every level (inf), 1 is 0.
    A schedule with a rule of its own (a continuous-EDM model's) applies it."""
    own = getattr(schedule, "percent_to_sigma", None)
    if own is not None:
        return float(own(percent))
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    return float(schedule.sigma((1.0 - percent) * (len(schedule.sigmas) - 1)))


def next_sigma(sigmas: "torch.Tensor | None", sigma: float) -> float | None:
    """The noise level a sampler heads for from ``sigma``, on the levels it visits (``sigmas``, the
    plan's list, its end included): the entry after the one equal to ``sigma``, or 0 past the last.
    A level the list does not hold (a multi-stage sampler's intermediate evaluation, an adaptive
    stepper's own step) heads for the first entry below it (0 when none is). None: no list known.

    What a network conditioned on its step's end reads (a MeanFlow model's second time input:
    HunyuanImage 2.1's distilled one, nodes.families.hunyuan_image): the denoiser hands it to the
    networks that ask (``WrappedTransformer.reads_next_sigma``), whichever sampler node runs them."""
    if sigmas is None or len(sigmas) == 0:
        return None
    levels = [float(s) for s in sigmas.reshape(-1)]
    tol = 1e-5 * max(abs(sigma), 1e-3)  # the round trip sigma -> timestep -> sigma in float32
    for i, level in enumerate(levels):
        if abs(level - sigma) <= tol:
            return levels[i + 1] if i + 1 < len(levels) else 0.0
    return next((level for level in levels if level < sigma), 0.0)


def training_schedule(config: Mapping[str, Any]) -> Any:
    """The model's training schedule (timestep <-> noise level): a flow model's own
    (:class:`nodes.samplers.flow.FlowSchedule`), a continuous-EDM model's
    (:class:`nodes.samplers.edm.EDMSchedule`), otherwise the DDPM one (:class:`TrainingSchedule`)."""
    from nodes.samplers import edm, flow

    if edm.is_edm(config):
        return edm.EDMSchedule(config)
    return flow.FlowSchedule(config) if flow.is_flow(config) else TrainingSchedule(config)


def append_zero(values: "torch.Tensor") -> "torch.Tensor":
    """A list of levels as float32, with the final 0 every sampled list ends in."""
    import torch

    return torch.cat([values.to(torch.float32), values.new_zeros(1, dtype=torch.float32)])


def comfy_schedule(ts: TrainingSchedule, name: str, steps: int) -> "torch.Tensor":
    """ComfyUI's schedule ``name`` for ``steps`` steps (``steps + 1`` sigmas)."""
    import torch

    if steps <= 0:
        return torch.zeros(0)
    if name in ("normal", "sgm_uniform"):
        start, end = float(ts.timestep(ts.sigma_max)), float(ts.timestep(ts.sigma_min))
        if name == "sgm_uniform":
            times = torch.linspace(start, end, steps + 1)[:-1]
        else:
            times = torch.linspace(start, end, steps)
        return append_zero(torch.stack([ts.sigma(t) for t in times]))
    if name == "simple":
        stride = len(ts.sigmas) / steps
        return append_zero(torch.stack([ts.sigmas[-(1 + int(i * stride))] for i in range(steps)]))
    if name == "karras":
        return karras(steps, ts.sigma_min, ts.sigma_max)
    if name == "exponential":
        return polyexponential(steps, ts.sigma_min, ts.sigma_max, 1.0)
    if name == "ddim_uniform":
        return _ddim_uniform(ts, steps)
    if name == "beta":
        return beta_levels(ts, steps)
    if name == "linear_quadratic":
        return _linear_quadratic(ts, steps)
    if name == "kl_optimal":
        # Sigmas evenly spaced in arctan(sigma) (A1111 PR 15608, as ComfyUI has it).
        w = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
        return append_zero((w * math.atan(ts.sigma_min) + (1 - w) * math.atan(ts.sigma_max)).tan())
    raise KeyError(f"unknown scheduler '{name}'")


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> "torch.Tensor":
    """Karras et al.'s schedule: ``steps`` sigmas evenly spaced in sigma^(1/rho), then 0."""
    import torch

    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def polyexponential(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> "torch.Tensor":
    """``steps`` levels whose log runs from sigma_max to sigma_min along ramp^rho (ramp 1 -> 0),
    then 0: rho 1 is the exponential schedule (even in log sigma), a larger rho spends more
    steps at low noise."""
    import torch

    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _ddim_uniform(ts: TrainingSchedule, steps: int) -> "torch.Tensor":
    """Every ``T // steps``-th training sigma from index 1 upwards, descending, ending in 0.

    This is DDIM's "uniform" timestep skip; like ComfyUI it may give one sigma more or
    less than ``steps`` when T is not a multiple of it.
    """
    import torch

    stride = max(len(ts.sigmas) // steps, 1)
    picked = [float(ts.sigmas[i]) for i in range(1, len(ts.sigmas), stride)]
    return torch.tensor([*picked[::-1], 0.0], dtype=torch.float32)


def beta_levels(ts: TrainingSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> "torch.Tensor":
    """Timesteps at the Beta(alpha, beta) quantiles (0.6, 0.6: dense at both ends, KSampler's
    ``beta``), repeats dropped."""
    import numpy as np
    import torch
    from scipy.stats import beta as beta_dist

    last = len(ts.sigmas) - 1
    times = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * last)
    picked: list[float] = []
    previous = None
    for t in times:
        if t != previous:
            picked.append(float(ts.sigmas[int(t)]))
        previous = t
    return torch.tensor([*picked, 0.0], dtype=torch.float32)


def _linear_quadratic(ts: TrainingSchedule, steps: int, threshold: float = 0.025) -> "torch.Tensor":
    """Mochi's schedule: linear for the first half up to ``threshold``, then quadratic, times sigma_max."""
    import torch

    if steps == 1:
        fractions = [1.0, 0.0]
    else:
        linear = steps // 2
        head = [i * threshold / linear for i in range(linear)]
        step_diff = linear - threshold * steps
        quad = steps - linear
        quad_coef = step_diff / (linear * quad ** 2)
        lin_coef = threshold / linear - 2 * step_diff / quad ** 2
        const = quad_coef * linear ** 2
        tail = [quad_coef * i ** 2 + lin_coef * i + const for i in range(linear, steps)]
        fractions = [1.0 - x for x in head + tail + [1.0]]
    return torch.tensor(fractions, dtype=torch.float32) * ts.sigma_max


def comfy_sigmas(ts: TrainingSchedule, name: str, steps: int, denoise: float = 1.0,
                 discard_penultimate: bool = False) -> "torch.Tensor":
    """The sigmas ComfyUI's KSampler runs for ``steps`` at ``denoise``.

    ComfyUI always runs exactly ``steps`` steps: with denoise < 1 it builds the
    schedule for ``int(steps / denoise)`` steps and keeps its last ``steps + 1``
    sigmas (steps=20, denoise=0.5 runs the quieter half of a 40-step schedule).
    denoise <= 0 leaves nothing to do (an empty list).
    """
    import torch

    def full(n: int) -> "torch.Tensor":
        if discard_penultimate:
            s = comfy_schedule(ts, name, n + 1)
            return torch.cat([s[:-2], s[-1:]])
        return comfy_schedule(ts, name, n)

    if denoise > 0.9999:
        return full(steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    return full(int(steps / denoise))[-(steps + 1):]


def diffusers_sigmas(config: Mapping[str, Any], name: str, steps: int) -> "torch.Tensor":
    """The ``steps``-step grid of schedule ``name`` as diffusers' k-schedulers build it
    from this checkpoint's config (schedules diffusers lacks are ComfyUI's)."""
    import torch
    from diffusers import EulerDiscreteScheduler

    if name not in DIFFUSERS_FLAGS:  # simple, ddim_uniform, linear_quadratic, kl_optimal: ComfyUI's
        return comfy_schedule(TrainingSchedule(config), name, steps)
    overrides = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "final_sigmas_type": "zero", **DIFFUSERS_FLAGS[name]}
    sched = EulerDiscreteScheduler.from_config(dict(config), **overrides)
    sched.set_timesteps(steps)
    return sched.sigmas.to(torch.float32)


def strength_steps(steps: int, strength: float) -> tuple[int, int]:
    """(first step index, steps run) of an N-step schedule at img2img ``strength``.

    diffusers' and A1111's rule: ``int(N * strength)`` steps run, starting at step
    ``N - int(N * strength)`` of the N-step grid, from the noise level of that step.
    """
    run = min(int(steps * strength), steps)
    return max(steps - run, 0), run
