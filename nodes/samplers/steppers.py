"""Turn (sampler, schedule) into a ready-to-step scheduler object.

Every stepper here has diffusers' scheduler surface: ``timesteps``, ``order``,
``scale_model_input(x, t)``, ``step(model_output, t, x, ...)`` returning an object
with ``prev_sample``. The sampling loop (``loop.py``) therefore treats diffusers'
schedulers and Kiln's own sigma-space sampler alike.

Two ways to make one:

* :func:`native` — diffusers' scheduler on its own grid (config switches select
  Karras/exponential/trailing spacing). Used whenever the scheduler can express the
  schedule itself, because then Kiln runs *exactly* what diffusers' pipelines run.
* :func:`on_sigmas` — a scheduler made to follow a given sigma list (ComfyUI's
  grids, ``simple``, or a schedule the class has no switch for). diffusers'
  k-schedulers build their arrays from the list their Karras hook returns, so the
  list is handed to them through that hook and the scheduler's own bookkeeping
  (Heun's doubled steps, DPM-2's midpoints, DPM-Solver's timesteps) does the rest.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from nodes.samplers.kdiffusion import STEPPERS, StagedStepper, ancestral_step, randn_like
from nodes.samplers.names import SamplerSpec, resolve_sampler
from nodes.samplers.schedules import DIFFUSERS_FLAGS

if TYPE_CHECKING:
    import torch

#: Classes with a ``use_karras_sigmas`` hook (``_convert_to_karras``) in diffusers.
_HOOKABLE = {
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
}
#: Classes that only know timestep spacing (no Karras/exponential switches).
_SPACING_ONLY = {"EulerAncestralDiscreteScheduler", "DDIMScheduler", "PNDMScheduler", "LCMScheduler",
                 "DDPMScheduler"}
#: Classes whose sample is variance-preserving (x = alpha * x0 + sigma_t * eps, the model
#: input unscaled) rather than k-diffusion's x0 + sigma * eps: the multistep solvers.
_VP_STATE = {"DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"}


def to_state(sched: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
    """A latent noised k-diffusion style (x0 + sigma * noise) in the space ``sched`` steps in.

    The plan forms starting latents as x0 + sigma * noise; a VP-state solver (DPM-Solver,
    UniPC, DEIS) on a sigma list needs that divided by sqrt(1 + sigma^2), which is
    what diffusers' own ``add_noise`` gives those classes on their native grids.
    """
    if type(sched).__name__ in _VP_STATE:
        return x / math.sqrt(1.0 + sigma ** 2)
    return x


def has_native(spec: SamplerSpec, schedule: str) -> bool:
    """Can diffusers' scheduler for ``spec`` build ``schedule`` on its own grid?"""
    if not spec.diffusers_class or schedule not in DIFFUSERS_FLAGS:
        return False
    if spec.diffusers_class in _SPACING_ONLY:
        return schedule in ("normal", "sgm_uniform")
    return True


def _scheduler_class(name: str) -> Any:
    import diffusers

    if name == "DPMSolverSDEScheduler":
        # torchsde warns on every query a float32 rounding outside its interval
        # ("Should have ta>=t0 but got ..."): harmless, and it would flood the job log.
        import warnings

        warnings.filterwarnings("ignore", message=r"Should have t[ab]", category=UserWarning)
    return getattr(diffusers, name)


#: Freshly built schedulers by (class, config, overrides): see :func:`_from_config`.
_BUILT: dict[str, Any] = {}


def _from_config(cls: Any, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    """``cls.from_config(dict(config), **overrides)``, built once per arguments and copied after.

    diffusers' DPM-2 classes run ``set_timesteps`` over all 1000 training steps in their
    constructor, a Python loop of about a second on a CPU, before Kiln calls
    ``set_timesteps`` for the run's own steps; every other class builds in milliseconds. A deep
    copy of the untouched first build is the same object state (the build is deterministic in
    its arguments) and costs a millisecond, so each KSampler run after the first gets it so.
    """
    import copy
    import json

    key = json.dumps([cls.__module__, cls.__qualname__, dict(config), dict(overrides)], sort_keys=True,
                     default=lambda v: repr(v.tolist() if hasattr(v, "tolist") else v))
    built = _BUILT.get(key)
    if built is None:
        built = cls.from_config(dict(config), **overrides)
        if len(_BUILT) >= 64:
            _BUILT.clear()
        _BUILT[key] = built
    return copy.deepcopy(built)


def _overrides(spec: SamplerSpec, **extra: Any) -> dict[str, Any]:
    """Config switches for ``from_config``: this sampler's, then the schedule's.

    They go in as keyword arguments, not into the config dict: diffusers drops dict
    values that the checkpoint's scheduler only had by default (``_use_default_values``)
    so a swapped-in class keeps its own defaults. That is what diffusers' pipelines
    do when a user swaps schedulers, and Kiln must do the same to match them.
    """
    return {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            **spec.config, **extra}


def native(spec: SamplerSpec, config: Mapping[str, Any], schedule: str, steps: int) -> Any:
    """diffusers' scheduler for ``spec`` with ``set_timesteps(steps)`` done on its own grid."""
    cls = _scheduler_class(spec.diffusers_class)
    sched = _from_config(cls, config, _overrides(spec, **DIFFUSERS_FLAGS[schedule]))
    sched.set_timesteps(steps)
    return sched


def from_state(sched: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
    """The inverse of :func:`to_state`: a stepper's state at ``sigma`` back in x0 + sigma * noise form
    (what a LATENT carries when sampling stops above sigma 0, e.g. KSamplerAdvanced's leftover noise)."""
    if type(sched).__name__ in _VP_STATE:
        return x * math.sqrt(1.0 + sigma ** 2)
    return x


def follow(spec: SamplerSpec, config: Mapping[str, Any], sigmas: "torch.Tensor") -> tuple[Any, "torch.Tensor"]:
    """A scheduler for ``spec`` over any sigma list, and the timesteps of its model evaluations.

    Unlike :func:`on_sigmas` the list may end above 0 (the high half of ComfyUI's
    SplitSigmas, KSamplerAdvanced's leftover noise): diffusers' classes always step
    down to their own final sigma, so they are given the whole list as a schedule one
    step longer and only its first ``len(sigmas) - 1`` steps run. Kiln's own steppers
    take any end as it is.
    """
    import torch

    steps = len(sigmas) - 1
    if float(sigmas[-1]) == 0.0:
        sched = on_sigmas(spec, config, sigmas)
        return sched, sched.timesteps
    if spec.sigma_fallback:
        spec = resolve_sampler(spec.sigma_fallback)
    if runs_kiln_stepper(spec):
        sched = kiln_stepper(spec, config, sigmas.to(torch.float32))
        return sched, sched.timesteps
    if spec.diffusers_class == "EulerAncestralDiscreteScheduler":
        sched = on_sigmas(spec, config, torch.cat([sigmas.to(torch.float32), torch.zeros(1)]))
        return sched, sched.timesteps[:steps]
    cls = _scheduler_class(spec.diffusers_class)
    if spec.diffusers_class not in _HOOKABLE:
        raise ValueError(f"sampler {spec.name} cannot follow a sigma schedule")
    import numpy as np

    sched = _from_config(cls, config, _overrides(spec, use_karras_sigmas=True))
    wanted = np.asarray(sigmas.tolist(), dtype=np.float64)
    sched._convert_to_karras = lambda *args, **kwargs: wanted.copy()
    sched.set_timesteps(steps + 1)
    return sched, sched.timesteps[:steps * sched.order]


def kiln_stepper_class(name: str) -> Any:
    """The class of a Kiln sigma-space stepper (``SamplerSpec.kiln_stepper``), whichever
    module defines it: each module keeps a table of its own steppers."""
    from nodes.samplers import adaptive, multistep, sde, stochastic

    table = {**STEPPERS, **adaptive.STEPPERS, **multistep.STEPPERS, **stochastic.STEPPERS, **sde.STEPPERS,
             "dpmpp_2s_ancestral": DPMpp2SAncestral}
    return table[name]


def runs_kiln_stepper(spec: SamplerSpec) -> bool:
    """Does Kiln's own stepper run ``spec`` on a sigma list? When diffusers has no class that
    can follow one, and when a Sampler* node changed a setting diffusers' class lacks."""
    if not spec.kiln_stepper:
        return False
    return bool(spec.options) or spec.diffusers_class not in _HOOKABLE | {"EulerAncestralDiscreteScheduler"}


def kiln_stepper(spec: SamplerSpec, config: Mapping[str, Any], sigmas: "torch.Tensor") -> Any:
    """Kiln's stepper for ``spec`` over ``sigmas``, with the spec's settings."""
    return kiln_stepper_class(spec.kiln_stepper)(config, sigmas, **dict(spec.options))


def with_settings(spec: SamplerSpec, **settings: Any) -> SamplerSpec:
    """``spec`` with a Sampler* node's settings, keeping only those that differ from what the
    name runs with (the stepper class's defaults): at the defaults the result is ``spec``
    itself, so it runs exactly as KSamplerSelect's does (diffusers' class where it has one)."""
    import dataclasses

    cls = kiln_stepper_class(spec.kiln_stepper)
    unknown = [k for k in settings if not hasattr(cls, k)]
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(unknown)}")
    changed = tuple(sorted((k, v) for k, v in settings.items() if getattr(cls, k) != v))
    return dataclasses.replace(spec, options=changed) if changed else spec


def on_sigmas(spec: SamplerSpec, config: Mapping[str, Any], sigmas: "torch.Tensor") -> Any:
    """A scheduler for ``spec`` that visits exactly ``sigmas`` (descending, ending in 0)."""
    import numpy as np
    import torch

    if spec.sigma_fallback:
        spec = resolve_sampler(spec.sigma_fallback)
    steps = len(sigmas) - 1
    if float(sigmas[-1]) != 0.0:
        raise ValueError("a sigma schedule must end with 0")
    if runs_kiln_stepper(spec):
        return kiln_stepper(spec, config, sigmas)
    cls = _scheduler_class(spec.diffusers_class)
    if spec.diffusers_class in _HOOKABLE:
        sched = _from_config(cls, config, _overrides(spec, use_karras_sigmas=True))
        wanted = np.asarray(sigmas[:-1].tolist(), dtype=np.float64)
        sched._convert_to_karras = lambda *args, **kwargs: wanted.copy()
        sched.set_timesteps(steps)
        return sched
    if spec.diffusers_class == "EulerAncestralDiscreteScheduler":
        # No Karras hook: its step reads only .sigmas and .timesteps, set both.
        from nodes.samplers.schedules import TrainingSchedule

        sched = _from_config(cls, config, _overrides(spec))
        sched.set_timesteps(steps)
        sched.sigmas = sigmas.to(torch.float32).clone()
        sched.timesteps = TrainingSchedule(config).timestep(sigmas[:-1]).to(torch.float32)
        return sched
    raise ValueError(f"sampler {spec.name} cannot follow a sigma schedule")


class DPMpp2SAncestral(StagedStepper):
    """DPM-Solver++(2S) ancestral over a sigma list (k-diffusion's ``dpmpp_2s_ancestral``).

    diffusers has no scheduler for it, so it is written here in the k-diffusion
    parameterisation every diffusers k-scheduler uses (x = x0 + sigma * eps, model
    input scaled by 1/sqrt(sigma^2 + 1)). Each step takes the ancestral target
    sigma_down, evaluates the model once more at the log-midpoint sqrt(sigma *
    sigma_down) (the "2S" second stage), lands on sigma_down and adds fresh noise of
    size sigma_up. Stages are laid out up front as a timestep list, like Heun's
    doubled list in diffusers, so the loop calls ``step`` once per model evaluation.
    """

    eta = 1.0
    s_noise = 1.0

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, sigmas, **options)
        self._x_start: "torch.Tensor | None" = None
        self._denoised_start: "torch.Tensor | None" = None

    def stage_sigmas(self, i: int) -> list[float]:
        s_from = float(self.sigmas[i])
        down = ancestral_step(s_from, float(self.sigmas[i + 1]), self.eta)[0]
        return [s_from, math.sqrt(s_from * down)] if down > 0 else [s_from]

    def _cfgpp_shift(self, guided: "torch.Tensor") -> Any:
        """CFG++ moves the exponential step's starting point by (guided - unguided); 0 otherwise."""
        return 0.0 if self._unguided is None else guided - self._unguided

    def advance(self, i: int, stage: int, sigma: float, sample: "torch.Tensor", denoised: "torch.Tensor",
                generator: Any) -> "torch.Tensor":
        s_i, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        down, up = ancestral_step(s_i, s_next, self.eta)
        if stage == 0 and down == 0:  # last step to sigma 0: plain Euler lands on the prediction
            x = denoised
        elif stage == 0:  # first stage: go to the log-midpoint and evaluate there next
            self._x_start, self._denoised_start = sample, denoised
            h = math.log(s_i) - math.log(down)
            start = sample + self._cfgpp_shift(denoised)
            return (math.sqrt(s_i * down) / s_i) * start - math.expm1(-h / 2) * denoised
        else:
            h = math.log(s_i) - math.log(down)
            x = (down / s_i) * (self._x_start + self._cfgpp_shift(self._denoised_start)) - math.expm1(-h) * denoised
            self._x_start = self._denoised_start = None
        if s_next > 0 and up > 0 and self.s_noise > 0:
            x = x + randn_like(x, generator) * (up * self.s_noise)
        return x
