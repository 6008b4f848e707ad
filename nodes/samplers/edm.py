"""Continuous-time (EDM) model sampling: CosXL, CosXL-Edit, Playground v2.5, and any model
put on ComfyUI's ModelSamplingContinuousEDM / ModelSamplingContinuousV.

Such a model was trained on a continuum of noise levels sigma in [sigma_min, sigma_max]
rather than on 1000 DDPM steps, so there are no training timesteps to look levels up in:
the network's time input is a fixed function of sigma, ``0.25 * log(sigma)`` (Karras et
al.'s c_noise, ModelSamplingContinuousEDM) or ``atan(sigma) * 2 / pi``
(ModelSamplingContinuousV). The state is the variance-exploding x = x0 + sigma * n, as
for the discrete families, and the preconditioning (Karras et al. 2022, table 1) depends
on the data's spread sigma_data:

* the network sees ``x / sqrt(sigma^2 + sigma_data^2)`` (c_in);
* ``epsilon``: x0 = x - sigma * out;
* ``v_prediction``: x0 = c_skip x - c_out out, ``edm`` (F-prediction): x0 = c_skip x + c_out out,
  with c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and
  c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).

ComfyUI runs eps and v_prediction at sigma_data 1 and edm at 0.5. diffusers' EDM schedulers
call the F-prediction ``epsilon`` (their c_out has the EDM sign): their ``epsilon`` at
sigma_data 0.5 is ``edm`` here, their ``v_prediction`` at sigma_data 1 is ``v_prediction``.

``rflow`` (ComfyUI's ModelSamplingCosmosRFlow, Cosmos Predict2 and Anima): a rectified-flow network on EDM
levels. Its flow time is ``t = sigma / (sigma + 1)``, which is also the network's time input; it sees
``x / (1 + sigma)`` (the flow state ``(1 - t) x0 + t eps``), predicts the velocity ``eps - x0``, so
x0 = ``x / (1 + sigma) - t * out``; noise is added as ``x0 + sigma * noise`` even from the top of the range
(diffusers' Cosmos2TextToImagePipeline scales its starting noise by sigma_max alike).

ComfyUI keeps its level table in float32 and reads sigma_min/sigma_max from it; Kiln keeps the
node's numbers exact (as diffusers' EDM schedulers do), a difference of about 1e-7 relative.
ModelSamplingContinuousV's atan time has no diffusers counterpart.

The model's scheduler config says all this (:func:`edm_config`); :func:`is_edm` tells such a
config apart, so ``plan.plan`` and the custom-sampling nodes hand EDM models here. Every
sampler runs as a Kiln sigma-space stepper reading :class:`EDMSchedule` (diffusers' k-schedulers
know only DDPM timesteps); the ones whose SD form is a diffusers class get their k-diffusion
form here (:data:`OWN`). Schedules are ComfyUI's over the EDM levels (``schedules.comfy_schedule``).

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from nodes.families.base import ConditioningError
from nodes.samplers.kdiffusion import SigmaStepper, StagedStepper, ancestral_step, denoised_from, randn_like
from nodes.samplers.schedules import VarianceExploding

if TYPE_CHECKING:
    import torch

    from nodes.samplers.names import SamplerSpec
    from nodes.samplers.plan import Plan

#: The scheduler class an EDM config names (diffusers' EDM Euler scheduler; Kiln only reads the marker).
EDM_CLASS = "EDMEulerScheduler"
#: Kiln's key for the sigma -> network time rule: "log" (0.25 log sigma), "atan" (ContinuousV) or "rflow"
#: (sigma / (sigma + 1), Cosmos').
TIME_KEY = "kiln_edm_time"
TIME_RULES = ("log", "atan", "rflow")
PREDICTIONS = ("epsilon", "v_prediction", "edm", "rflow")


def edm_config(prediction_type: str, sigma_min: float, sigma_max: float, sigma_data: float,
               time: str = "log") -> dict[str, Any]:
    """The scheduler config of a continuous-EDM model (what a MODEL handle carries)."""
    if prediction_type not in PREDICTIONS or time not in TIME_RULES:
        raise ValueError(f"unknown EDM sampling {prediction_type!r} / {time!r}")
    return {"_class_name": EDM_CLASS, "prediction_type": prediction_type, "sigma_min": float(sigma_min),
            "sigma_max": float(sigma_max), "sigma_data": float(sigma_data), TIME_KEY: time}


def is_edm(config: Mapping[str, Any]) -> bool:
    """Whether a model with this scheduler config is sampled in continuous time."""
    return config.get("_class_name") in (EDM_CLASS, "EDMDPMSolverMultistepScheduler")


class EDMSchedule(VarianceExploding):
    """The continuous counterpart of ``schedules.TrainingSchedule``: sigma <-> network time by the
    model's rule, and ``sigmas``: 1000 levels evenly spaced in log sigma from sigma_min to
    sigma_max (ComfyUI's table, which its ``simple``, ``ddim_uniform`` and ``beta`` schedules
    pick from)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        import torch

        self._min = float(config.get("sigma_min", 0.002))
        self._max = float(config.get("sigma_max", 120.0))
        self.sigma_data = float(config.get("sigma_data", 1.0))
        self.time = config.get(TIME_KEY, "log")
        if not 0.0 < self._min < self._max:
            raise ConditioningError(f"the EDM sigmas need 0 < sigma_min < sigma_max, got {self._min} and "
                                    f"{self._max}", "sigma_min")
        self.sigmas = torch.linspace(math.log(self._min), math.log(self._max), 1000, dtype=torch.float64).exp()
        self.sigmas = self.sigmas.to(torch.float32)
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self._min

    @property
    def sigma_max(self) -> float:
        return self._max

    def timestep(self, sigma: "torch.Tensor | float") -> "torch.Tensor":
        """The network's time input at ``sigma``."""
        import torch

        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if self.time == "rflow":
            return sigma / (sigma + 1)
        return sigma.atan() * (2 / math.pi) if self.time == "atan" else 0.25 * sigma.log()

    def sigma(self, t: "torch.Tensor | float") -> "torch.Tensor":
        import torch

        t = torch.as_tensor(t, dtype=torch.float32)
        if self.time == "rflow":
            return t / (1 - t)
        return (t * (math.pi / 2)).tan() if self.time == "atan" else (t / 0.25).exp()

    def model_input(self, sample: "torch.Tensor", sigma: float) -> "torch.Tensor":
        """c_in: the state scaled to unit variance for data of spread sigma_data (``rflow``: the flow state)."""
        if self.time == "rflow":
            return sample / (1.0 + sigma)
        return sample / math.sqrt(sigma ** 2 + self.sigma_data ** 2)

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's fraction of sampling -> level for EDM models: log-linear from sigma_max (0)
        to sigma_min (just below 1); 0 lies above every level, 1 is 0."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        low = math.log(self._min)
        return math.exp((math.log(self._max) - low) * (1.0 - percent) + low)


# -- the samplers whose SD form is a diffusers class, in k-diffusion's form ------------------

class Euler(SigmaStepper):
    """k-diffusion's Euler step along d = (x - x0) / sigma (diffusers' EDMEulerScheduler without churn)."""

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        return x + (x - denoised) / sigma * (sigma_next - sigma)


class Heun(StagedStepper):
    """Heun's method (Karras et al. algorithm 1 without churn): an Euler step, a second
    evaluation at its end, the mean of the two slopes; the step to 0 is Euler's."""

    def stage_sigmas(self, i: int) -> list[float]:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        return [sigma] if sigma_next == 0 else [sigma, sigma_next]

    def advance(self, i, k, sigma, x, denoised, generator):
        start, end = float(self.sigmas[i]), float(self.sigmas[i + 1])
        d = (x - denoised) / sigma
        if k == 0:
            self._x, self._d = x, d
            return x + d * (end - start)
        return self._x + (self._d + d) / 2 * (end - start)


class DPM2Ancestral(StagedStepper):
    """k-diffusion's ``dpm_2_ancestral``: DPM-Solver-2 to the ancestral sigma_down (the slope of
    the log-midpoint, reached by an Euler half step), then fresh noise of size sigma_up."""

    eta = 1.0
    s_noise = 1.0

    def stage_sigmas(self, i: int) -> list[float]:
        sigma = float(self.sigmas[i])
        down = ancestral_step(sigma, float(self.sigmas[i + 1]), self.eta)[0]
        return [sigma] if down == 0 else [sigma, math.sqrt(sigma * down)]

    def advance(self, i, k, sigma, x, denoised, generator):
        start, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        down, up = ancestral_step(start, sigma_next, self.eta)
        if k == 0:
            self._x = x
            d = (x - denoised) / sigma
            if down > 0:
                return x + d * (math.sqrt(sigma * down) - sigma)  # to the midpoint, evaluated next
            out = x + d * (down - sigma)
        else:
            out = self._x + (x - denoised) / sigma * (down - start)  # sigma: the midpoint
        if up > 0 and self.s_noise > 0:
            out = out + randn_like(out, generator) * (up * self.s_noise)
        return out


class DPMpp2M(SigmaStepper):
    """DPM-Solver++(2M) (k-diffusion's ``dpmpp_2m``): the exponential step in -log sigma with the
    second-order correction from the previous prediction; the step to 0 lands on the prediction."""

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, sigmas, **options)
        self._old: "torch.Tensor | None" = None

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        old, self._old = self._old, denoised
        if sigma_next == 0:
            return denoised
        h = math.log(sigma / sigma_next)
        blended = denoised
        if old is not None:
            r = math.log(float(self.sigmas[i - 1]) / sigma) / h
            blended = (1 + 1 / (2 * r)) * denoised - old / (2 * r)
        return (sigma_next / sigma) * x - math.expm1(-h) * blended


class UniPCFrame:
    """diffusers' UniPC over an EDM model's sigma list: the network output becomes the noise
    prediction (x - x0) / sigma of the variance-exploding state, which diffusers' scheduler
    steps in its variance-preserving form x / sqrt(1 + sigma^2) (as ComfyUI's UniPC does with
    any model). bh1 stops at sigma 0.001 instead of 0, as ComfyUI's UniPC and flow_ve's do."""

    order = 1

    def __init__(self, spec: "SamplerSpec", config: Mapping[str, Any], sigmas: "torch.Tensor") -> None:
        import numpy as np
        import torch
        from diffusers import UniPCMultistepScheduler

        from nodes.samplers.flow_ve import BH1_END

        self.schedule = EDMSchedule(config)
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.sigmas = torch.unique_consecutive(sigmas.to(torch.float32))
        steps = len(self.sigmas) - 1
        ends_above = float(self.sigmas[-1]) > 0
        visited = self.sigmas if ends_above else self.sigmas[:-1]
        inner = UniPCMultistepScheduler(prediction_type="epsilon", use_karras_sigmas=True,
                                        **{**spec.config, "final_sigmas_type": "zero"})
        wanted = np.asarray(visited.tolist(), dtype=np.float64)
        inner._convert_to_karras = lambda *args, **kwargs: wanted.copy()
        inner.set_timesteps(len(wanted))
        # EDM levels above the DDPM range share DDPM timestep 999: find steps by index, never by timestep
        inner.set_begin_index(0)
        if not ends_above and spec.config.get("solver_type") == "bh1":
            inner.sigmas[-1] = BH1_END
        self.inner = inner
        self.timesteps = self.schedule.timestep(self.sigmas[:steps]).to(torch.float32)
        self._index = 0

    def set_begin_index(self, index: int = 0) -> None:
        self._index = index

    def scale_model_input(self, sample: "torch.Tensor", timestep: Any = None) -> "torch.Tensor":
        return self.schedule.model_input(sample, float(self.sigmas[self._index]))

    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor",
             generator: Any = None, return_dict: bool = True) -> Any:
        from nodes.samplers.kdiffusion import StepOutput

        i = self._index
        self._index += 1
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        denoised = denoised_from(self.prediction_type, model_output, sample, sigma, self.schedule.sigma_data)
        eps = (sample - denoised) / sigma
        vp = self.inner.step(eps, self.inner.timesteps[i], sample / math.sqrt(1 + sigma * sigma)).prev_sample
        return StepOutput(vp * math.sqrt(1 + sigma_next * sigma_next), denoised)


#: Sampler name -> its EDM stepper, for the names whose SD form is a diffusers class.
OWN: dict[str, Any] = {"euler": Euler, "heun": Heun, "dpm_2_ancestral": DPM2Ancestral, "dpmpp_2m": DPMpp2M}
UNIPC = ("uni_pc", "uni_pc_bh2")


def edm_spec(spec: "SamplerSpec") -> "SamplerSpec":
    """The sampler that runs ``spec`` on a sigma list: ``ddim`` is Euler and ``plms`` LMS, as on SD."""
    from nodes.samplers.names import resolve_sampler

    return resolve_sampler(spec.sigma_fallback) if spec.sigma_fallback else spec


def check_sampler(spec: "SamplerSpec", input_name: str = "sampler_name") -> None:
    """Refuse a sampler with no continuous-time form, naming ``input_name``."""
    spec = edm_spec(spec)
    if spec.name not in OWN and spec.name not in UNIPC and not spec.kiln_stepper:
        raise ConditioningError(f"sampler {spec.name!r} has no continuous-time (EDM) form in Kiln", input_name)


def follow(spec: "SamplerSpec", config: Mapping[str, Any], sigmas: "torch.Tensor",
           input_name: str = "sampler") -> Any:
    """The stepper for ``spec`` over exactly ``sigmas`` (descending; may end above 0) on an EDM model."""
    import torch

    from nodes.samplers.steppers import kiln_stepper

    check_sampler(spec, input_name)
    spec = edm_spec(spec)
    sigmas = sigmas.to("cpu", torch.float32)
    if spec.name in UNIPC:
        return UniPCFrame(spec, config, sigmas)
    if spec.name in OWN:
        return OWN[spec.name](config, sigmas, **dict(spec.options))
    return kiln_stepper(spec, config, sigmas)


def start(schedule: EDMSchedule, sigma0: float, noise: "torch.Tensor", x0: "torch.Tensor") -> "torch.Tensor":
    """ComfyUI's noise scaling: from the top of the range (or above) noise * sqrt(1 + sigma^2)
    is added (diffusers' EDM ``init_noise_sigma``), below it noise * sigma; ``rflow`` models always
    take noise * sigma (ComfyUI's COSMOS_RFLOW)."""
    if schedule.time == "rflow":
        return x0 + noise * sigma0
    full = math.isclose(schedule.sigma_max, sigma0, rel_tol=1e-5) or sigma0 > schedule.sigma_max
    return x0 + noise * (math.sqrt(1.0 + sigma0 ** 2) if full else sigma0)


def plan(spec: "SamplerSpec", schedule: str, config: Mapping[str, Any], steps: int, *, x0: "torch.Tensor",
         noise: "torch.Tensor", strength: float | None, denoise: float) -> "Plan":
    """KSampler's plan on an EDM model: ComfyUI's schedule over the EDM levels for ``steps``
    (``denoise`` < 1: the tail of ``steps / denoise``; AddNoise's ``strength``: the last
    ``int(steps * strength)`` steps of the ``steps``-step list), ComfyUI's start."""
    import torch

    from nodes.samplers import schedules
    from nodes.samplers.plan import MODE_COMFY, MODE_IMG2IMG, MODE_TXT2IMG, Plan

    check_sampler(spec)
    ts = EDMSchedule(config)
    discard = edm_spec(spec).discard_penultimate_sigma
    if strength is not None:
        first, run = schedules.strength_steps(steps, strength)
        mode = MODE_IMG2IMG
        sigmas = schedules.comfy_sigmas(ts, schedule, steps, 1.0, discard)[first:] if run else torch.zeros(0)
    else:
        mode = MODE_COMFY if denoise < 0.9999 else MODE_TXT2IMG
        sigmas = schedules.comfy_sigmas(ts, schedule, steps, denoise, discard)
    if len(sigmas) < 2:
        return Plan(mode, None, torch.zeros(0), None, sigmas)
    stepper = follow(spec, config, sigmas, "sampler_name")
    return Plan(mode, stepper, stepper.timesteps, start(ts, float(sigmas[0]), noise, x0), sigmas)
