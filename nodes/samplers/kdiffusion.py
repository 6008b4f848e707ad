"""Samplers diffusers has no scheduler for, as Kiln steppers over a sigma list.

Each one is ComfyUI's published algorithm (``comfy/k_diffusion/sampling.py``:
``sample_ipndm``, ``res_multistep`` with eta = 0, ``sample_lcm``, ``sample_ddpm``,
``sample_dpm_fast``),
rewritten on diffusers' scheduler surface so the sampling loop runs it like any
other: ``timesteps``, ``scale_model_input``, ``step`` returning ``prev_sample``.
They work in the k-diffusion parameterisation every diffusers k-scheduler uses:
the state is x = x0 + sigma * eps, the model sees x / sqrt(sigma^2 + 1) at the
timestep of sigma, and one model evaluation is one step.

``lcm`` and ``ddpm`` also have diffusers schedulers (LCMScheduler, DDPMScheduler),
which run on their own timestep grids; these steppers are their counterparts on a
sigma list (ComfyUI's grids), where a timestep-only scheduler cannot go. Fresh
noise (LCM, DDPM) comes from each image's generator, like every stochastic sampler.

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch


@dataclass
class StepOutput:
    prev_sample: "torch.Tensor"
    pred_original_sample: "torch.Tensor | None" = None


def randn_like(x: "torch.Tensor", generator: Any) -> "torch.Tensor":
    """Noise shaped like ``x`` from one generator per batch item (or one for all)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def denoised_from(prediction_type: str, out: "torch.Tensor", x: "torch.Tensor", sigma: float,
                  sigma_data: float = 1.0) -> "torch.Tensor":
    """The model's clean-latent prediction, for a state x = x0 + sigma * eps. ``sigma_data``: the
    data spread of a continuous-EDM model's preconditioning (nodes.samplers.edm; 1 for DDPM models),
    where ``edm`` is Karras et al.'s F-prediction, v's skip term with the opposite output sign."""
    if prediction_type in ("epsilon", "flow"):  # a flow state x = (1 - t) x0 + t eps, velocity eps - x0
        return x - sigma * out
    if prediction_type in ("v_prediction", "edm"):
        # With sigma_data 1 these products are exact: DDPM models keep their arithmetic bit for bit.
        var = sigma_data * sigma_data
        skip = x * var / (sigma ** 2 + var)
        scaled = out * (sigma * sigma_data / (sigma ** 2 + var) ** 0.5)
        return skip - scaled if prediction_type == "v_prediction" else skip + scaled
    if prediction_type == "sample":
        return out
    if prediction_type == "rflow":  # a rectified flow on EDM levels (nodes.samplers.edm): t = sigma / (sigma + 1)
        return x / (1.0 + sigma) - out * (sigma / (1.0 + sigma))
    raise ValueError(f"unsupported prediction_type {prediction_type}")


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's ancestral split of a step: (sigma_down to step to deterministically,
    sigma_up of fresh noise to add) with sigma_down^2 + sigma_up^2 = sigma_next^2."""
    if not eta:
        return sigma_next, 0.0
    shrink = 1.0 if math.isinf(sigma) else (sigma ** 2 - sigma_next ** 2) / sigma ** 2  # from pure noise: 1
    up = min(sigma_next, eta * math.sqrt(max(sigma_next ** 2 * shrink, 0.0)))
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


def set_options(stepper: Any, options: Mapping[str, Any]) -> None:
    """Set a sampler's settings (ComfyUI's Sampler* nodes: eta, s_noise, orders, ...) on
    ``stepper``. A setting is a class attribute of the stepper, whose value there is the
    default ComfyUI's KSampler runs the name with, so the defaults live in one place; an
    option the class does not declare is a programming error."""
    for name, value in options.items():
        if not hasattr(type(stepper), name) or callable(getattr(type(stepper), name)):
            raise TypeError(f"{type(stepper).__name__} has no setting {name!r}")
        setattr(stepper, name, value)


class StagedStepper:
    """Base for samplers with several model evaluations per step: ``stages`` lists every
    evaluation as (step, stage, sigma the model sees), laid out up front (as diffusers lays
    out Heun's doubled list), so the loop calls ``step`` once per evaluation and ``step``
    hands each one to ``advance``. ``stage_sigmas(i)`` is read once per step, at construction."""

    order = 1
    #: The current evaluation's unguided prediction: set by :class:`CFGPP` steppers, None otherwise.
    _unguided: "torch.Tensor | None" = None

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        import torch

        from nodes.samplers.schedules import training_schedule

        set_options(self, options)
        self.prediction_type = config.get("prediction_type", "epsilon")
        # A level repeated in the list (a hand-made SIGMAS) is a step of length 0, across which
        # the exponential and multistep formulas would divide by zero: it is dropped, so every
        # step here moves and the model is not evaluated for nothing.
        self.sigmas = torch.unique_consecutive(sigmas.to(torch.float32))
        self.schedule = training_schedule(config)
        #: The data spread of the model's preconditioning (a continuous-EDM model's; 1 otherwise).
        self.sigma_data = float(getattr(self.schedule, "sigma_data", 1.0))
        self.stages: list[tuple[int, int, float]] = []
        for i in range(self.step_count()):
            self.stages.extend((i, k, sigma) for k, sigma in enumerate(self.stage_sigmas(i)))
        stage_sigmas = torch.tensor([sigma for _, _, sigma in self.stages], dtype=torch.float32)
        self.timesteps = self.schedule.timestep(stage_sigmas).to(torch.float32)
        self._index = 0

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas.max() ** 2 + 1) ** 0.5

    def set_begin_index(self, index: int = 0) -> None:
        self._index = index

    def scale_model_input(self, sample: "torch.Tensor", timestep: Any = None) -> "torch.Tensor":
        return self.schedule.model_input(sample, self.stages[self._index][2])

    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor",
             generator: Any = None, return_dict: bool = True) -> StepOutput:
        i, k, sigma = self.stages[self._index]
        self._index += 1
        denoised = denoised_from(self.prediction_type, model_output, sample, sigma, self.sigma_data)
        return StepOutput(self.advance(i, k, sigma, sample, denoised, generator), denoised)

    def step_count(self) -> int:
        """Steps to lay out: one per interval of the list, unless the sampler keeps its own grid."""
        return len(self.sigmas) - 1

    def stage_sigmas(self, i: int) -> list[float]:
        raise NotImplementedError

    def advance(self, i: int, k: int, sigma: float, x: "torch.Tensor", denoised: "torch.Tensor",
                generator: Any) -> "torch.Tensor":
        """Stage ``k`` of step ``i``, evaluated at ``sigma``: the state the next evaluation sees
        (or the step's result after its last stage)."""
        raise NotImplementedError


class SigmaStepper(StagedStepper):
    """One model evaluation per step over ``sigmas`` (descending, ending in 0): each step is
    one stage, handed to ``update`` with its two ends."""

    def stage_sigmas(self, i: int) -> list[float]:
        return [float(self.sigmas[i])]

    def advance(self, i, k, sigma, x, denoised, generator):
        return self.update(i, x, denoised, sigma, float(self.sigmas[i + 1]), generator)

    def update(self, i: int, x: "torch.Tensor", denoised: "torch.Tensor", sigma: float, sigma_next: float,
               generator: Any) -> "torch.Tensor":
        raise NotImplementedError


class CFGPP:
    """CFG++ (Chung et al. 2024, arXiv 2406.08070) for a stepper whose math reads
    ``self._unguided``: ``step`` also takes the unguided network output, turns it
    into a clean-latent prediction at the sigma being evaluated and hands it on.
    Without it (no guidance) the stepper runs its plain form."""

    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor",
             generator: Any = None, return_dict: bool = True, uncond: "torch.Tensor | None" = None) -> StepOutput:
        sigma = self.stages[self._index][2]
        self._unguided = None if uncond is None else denoised_from(self.prediction_type, uncond, sample, sigma,
                                                                   self.sigma_data)
        return super().step(model_output, timestep, sample, generator, return_dict)


class LCM(SigmaStepper):
    """Latent consistency sampling: jump to the prediction, re-noise to the next level (the
    model's own noising: x0 + sigma n on SD, the blend (1 - t) x0 + t n on a flow model).

    SamplerLCMUpscale's settings (ComfyUI's ``sample_lcm_upscale``): the prediction is resized
    after each of the first ``upscale_steps`` steps (-1: about half of them), growing evenly
    to ``total_upscale`` times the starting size, before it is re-noised; 1 changes nothing."""

    total_upscale = 1.0
    upscale_steps = -1
    upscale_method = "bislerp"
    _start_size: "tuple[int, int] | None" = None

    @property
    def resizes(self) -> bool:
        """Whether the state grows while sampling (a noise mask cannot follow it)."""
        return self.total_upscale != 1.0

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        denoised = self._grown(i, denoised)
        if sigma_next > 0:
            return self.schedule.alpha(sigma_next) * denoised + sigma_next * randn_like(denoised, generator)
        return denoised

    def _grown(self, i: int, denoised: "torch.Tensor") -> "torch.Tensor":
        if not self.resizes:
            return denoised
        import numpy as np

        from nodes.resample import resize

        intervals = len(self.sigmas) - 1
        count = max(intervals // 2 + 1, 2) if self.upscale_steps < 0 else min(self.upscale_steps + 1, intervals + 1)
        factors = np.linspace(1.0, self.total_upscale, count)[1:]
        if i >= len(factors):
            return denoised
        if self._start_size is None:
            self._start_size = (denoised.shape[-2], denoised.shape[-1])
        h, w = self._start_size
        return resize(denoised, round(w * factors[i]), round(h * factors[i]), self.upscale_method)


class DDPM(SigmaStepper):
    """Ancestral DDPM (Ho et al.) on a sigma list: the posterior mean plus its variance's noise.

    The step is taken in variance-preserving space (x / sqrt(1 + sigma^2)), with
    alpha-bar = 1 / (1 + sigma^2) at each end, as ComfyUI's ``DDPMSampler_step``.
    """

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        eps = (x - denoised) / sigma
        x_vp = x / math.sqrt(1.0 + sigma ** 2)
        ac, ac_prev = 1 / (sigma ** 2 + 1), 1 / (sigma_next ** 2 + 1)
        alpha = ac / ac_prev
        mu = math.sqrt(1.0 / alpha) * (x_vp - (1 - alpha) * eps / math.sqrt(1 - ac))
        if sigma_next > 0:
            mu = mu + math.sqrt((1 - alpha) * (1.0 - ac_prev) / (1.0 - ac)) * randn_like(mu, generator)
            return mu * math.sqrt(1.0 + sigma_next ** 2)
        return mu


class IPNDM(SigmaStepper):
    """Improved PNDM: Adams-Bashforth on the derivative d = (x - x0) / sigma, up to
    fourth order from the previous derivatives; the last step lands on the prediction."""

    max_order = 4

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, sigmas, **options)
        self._history: list["torch.Tensor"] = []

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        d = (x - denoised) / sigma
        h = self._history
        order = min(self.max_order, len(h) + 1)
        if sigma_next == 0:
            out = denoised
        elif order == 1:
            out = x + (sigma_next - sigma) * d
        elif order == 2:
            out = x + (sigma_next - sigma) * (3 * d - h[-1]) / 2
        elif order == 3:
            out = x + (sigma_next - sigma) * (23 * d - 16 * h[-1] + 5 * h[-2]) / 12
        else:
            out = x + (sigma_next - sigma) * (55 * d - 59 * h[-1] + 37 * h[-2] - 9 * h[-3]) / 24
        h.append(d)
        del h[:-(self.max_order - 1)]
        return out


class ResMultistep(SigmaStepper):
    """RES second-order multistep (arXiv 2308.02157) as ComfyUI's ``res_multistep``:
    an exponential-integrator step in t = -log(sigma) that reuses the previous
    prediction; the first and the last step are Euler steps.

    ComfyUI's one function also has the ancestral (``eta`` > 0) and CFG++ variants;
    this class holds their math too, so the variants in ``stochastic.py`` only set
    ``eta`` or hand in the unguided prediction. With ``eta`` > 0 each step goes to the
    ancestral sigma_down and adds fresh noise of size sigma_up; the multistep weight
    then measures the previous step from its own sigma_down. With ``_unguided`` set
    (CFG++) the step direction and the remembered prediction are the unguided ones and
    the state is first shifted by (guided - unguided), as ComfyUI's ``cfg_pp`` branch.
    """

    eta = 0.0

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, sigmas, **options)
        self._old_denoised: "torch.Tensor | None" = None
        self._old_down = 0.0

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        down, up = ancestral_step(sigma, sigma_next, self.eta)
        plain = denoised if self._unguided is None else self._unguided
        old, self._old_denoised = self._old_denoised, plain
        old_down, self._old_down = self._old_down, down
        if down == 0 or old is None:
            out = denoised + (x - plain) / sigma * down
        else:
            t, t_next = -math.log(sigma), -math.log(down)
            t_old, t_prev = -math.log(old_down), -math.log(float(self.sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h  # with eta = 0 the previous step landed on sigma itself
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            start = x if plain is denoised else x + (denoised - plain)
            out = math.exp(-h) * start + h * (b1 * plain + b2 * old)
        if up > 0:
            out = out + randn_like(out, generator) * up
        return out


class DPMFast(StagedStepper):
    """DPM-Solver-fast (Lu et al. 2022, as k-diffusion's ``dpm_solver_fast`` with eta = 0).

    ComfyUI's ``dpm_fast`` keeps only the ends of the schedule it is given: it spends
    its ``steps`` model evaluations on an even grid in t = -log(sigma) from the first
    sigma down to the smallest nonzero one, in third-order steps (three evaluations:
    at t, t + h/3, t + 2h/3) and a second/first-order tail so the count comes out
    exact. Like ComfyUI's, it stops at that smallest sigma rather than at 0, and it lays
    out the stages of its own grid (``step_count``), not of the list's intervals.
    """

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        nfe = len(sigmas) - 1
        sigma_max = float(sigmas[0])
        # One step has no nonzero end: ComfyUI then takes the start, and the step changes nothing.
        sigma_min = float(sigmas[-2]) if float(sigmas[-1]) == 0 else float(sigmas[-1])
        m = nfe // 3 + 1
        t0, t1 = -math.log(sigma_max), -math.log(sigma_min)
        self.grid = [t0 + (t1 - t0) * k / m for k in range(m + 1)]
        self.orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        super().__init__(config, sigmas, **options)
        self._x: "torch.Tensor | None" = None
        self._eps: list["torch.Tensor"] = []

    def step_count(self) -> int:
        return len(self.orders)

    def stage_sigmas(self, i: int) -> list[float]:
        t, h, order = self.grid[i], self.grid[i + 1] - self.grid[i], self.orders[i]
        return [math.exp(-(t + h * k / order)) for k in range(order)]

    def advance(self, i, k, sigma, sample, denoised, generator):
        if k == 0:
            self._x, self._eps = sample, []
        self._eps.append((sample - denoised) / sigma)
        order, x, eps = self.orders[i], self._x, self._eps
        t, t_next = self.grid[i], self.grid[i + 1]
        h = t_next - t
        s_next = math.exp(-t_next)
        em1 = math.expm1(h)
        if order == 1:
            out = x - s_next * em1 * eps[0]
        elif order == 2 and k == 0:  # to the midpoint, evaluated next
            out = x - math.exp(-(t + h / 2)) * math.expm1(h / 2) * eps[0]
        elif order == 2:
            out = x - s_next * em1 * eps[0] - s_next * em1 * (eps[1] - eps[0])  # r1 = 1/2: 1 / (2 r1) = 1
        elif k == 0:  # third order: to t + h/3
            out = x - math.exp(-(t + h / 3)) * math.expm1(h / 3) * eps[0]
        elif k == 1:  # to t + 2h/3, with the first correction
            r1, r2 = 1 / 3, 2 / 3
            out = (x - math.exp(-(t + r2 * h)) * math.expm1(r2 * h) * eps[0]
                   - math.exp(-(t + r2 * h)) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps[1] - eps[0]))
        else:
            out = x - s_next * em1 * eps[0] - s_next / (2 / 3) * (em1 / h - 1) * (eps[2] - eps[0])
        return out


class EulerAncestral(SigmaStepper):
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``) with the settings of
    ComfyUI's SamplerEulerAncestral: an Euler step to the ancestral sigma_down, then fresh
    noise of size s_noise * sigma_up. With eta 1 and s_noise 1 (KSampler's
    ``euler_ancestral``) Kiln runs diffusers' EulerAncestralDiscreteScheduler instead, for
    parity with diffusers' pipelines; this stepper runs other settings.

    The CFG++ forms (:class:`EulerCFGPP`, :class:`EulerAncestralCFGPP`) step along the
    *unguided* prediction, x' = alpha' (denoised + sigma_down (x - alpha uncond_denoised) /
    sigma), which keeps the sample on the data manifold at low guidance scales (Chung et
    al. 2024, arXiv 2406.08070; CFG++ is used with cfg around 1-2). alpha is the clean
    latent's weight and the ancestral split is taken on sigma / alpha, as ComfyUI's
    ``sample_euler_ancestral_cfg_pp``: on SD alpha = 1; on a flow model alpha = 1 - t, so
    the CFG++ forms run there too (the plain one has its RF form, ``flow_ancestral``)."""

    eta = 1.0
    s_noise = 1.0

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        plain = denoised if self._unguided is None else self._unguided
        alpha, alpha_next = self.schedule.alpha(sigma), self.schedule.alpha(sigma_next)
        down, up = ancestral_step(sigma / alpha if alpha > 0 else math.inf, sigma_next / alpha_next, self.eta)
        out = alpha_next * (denoised + (x - alpha * plain) / sigma * down)
        if up > 0 and self.s_noise > 0:
            out = out + randn_like(out, generator) * (alpha_next * up * self.s_noise)
        return out


class EulerCFGPP(CFGPP, EulerAncestral):
    """ComfyUI's ``euler_cfg_pp``: CFG++ Euler, no fresh noise. Without guidance (no
    unguided prediction handed in) this is plain Euler.

    ``version`` "alternative" (SamplerEulerCFG++'s other choice, ComfyUI's ``sample_euler_pp``)
    steps along (x - 2 denoised + uncond_denoised) / sigma instead: the guided prediction's
    direction with the guidance difference added once more."""

    eta = 0.0
    version = "regular"

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        if self.version != "alternative":
            return super().update(i, x, denoised, sigma, sigma_next, generator)
        plain = denoised if self._unguided is None else self._unguided
        return x + (x - 2 * denoised + plain) / sigma * (sigma_next - sigma)


class EulerAncestralCFGPP(CFGPP, EulerAncestral):
    """ComfyUI's ``euler_ancestral_cfg_pp`` (eta 1, s_noise 1 unless SamplerEulerAncestralCFGPP
    sets them): to the ancestral sigma_down along the unguided direction, then fresh noise."""


STEPPERS: dict[str, Any] = {"lcm": LCM, "ddpm": DDPM, "ipndm": IPNDM, "res_multistep": ResMultistep,
                            "dpm_fast": DPMFast, "euler_ancestral": EulerAncestral, "euler_cfg_pp": EulerCFGPP,
                            "euler_ancestral_cfg_pp": EulerAncestralCFGPP}
