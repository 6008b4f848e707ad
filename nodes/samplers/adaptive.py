"""Adaptive DPM-Solver (``dpm_adaptive``): a sampler that chooses its own steps.

Apart from the other Kiln steppers because it is not laid out over the sigma list: it keeps
only the list's ends, and its timestep list grows as its step-size controller accepts or
rejects attempts (the sampling loop follows the list as it grows).

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from nodes.samplers.kdiffusion import StepOutput, ancestral_step, denoised_from, randn_like, set_options

if TYPE_CHECKING:
    import torch


class _PID:
    """k-diffusion's PID step-size controller (Söderlind's digital filters; ComfyUI's defaults
    are a pure I controller): grow or shrink h by the error's history, accept when the
    proposed factor is at least ``accept_safety``."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


class DPMAdaptive:
    """Adaptive DPM-Solver (Lu et al. 2022, k-diffusion's ``dpm_solver_adaptive``, ComfyUI's
    ``dpm_adaptive``), with ComfyUI's defaults as class settings (SamplerDPMAdaptative sets
    them): order 3, rtol 0.05, atol 0.0078, h_init 0.05, a pure I controller, eta 0.

    It keeps only the ends of the list it is given (the first sigma and the smallest
    nonzero one, where it stops, as ComfyUI's does) and chooses its own steps in
    t = -log(sigma): each attempt evaluates the model three times (at t, t + h/3,
    t + 2h/3; order 2: twice, at t and t + h/2), compares the lower-order and higher-order
    results element by element against rtol and atol, and a PID controller accepts the
    step or retries it shorter. With eta > 0 an attempt solves to the ancestral sigma_down
    of its step and an accepted step adds fresh noise of sigma_up times s_noise
    (variance-exploding noise: flow models refuse it). The number of model
    evaluations is therefore not known up front: ``timesteps`` grows as the solver
    goes, and the loop (which iterates over the same list) follows it; progress
    reports the evaluations so far against the growing total.
    """

    order = 1  # the scheduler surface's: one model evaluation per ``step`` call
    solver_order = 3
    rtol = 0.05
    atol = 0.0078
    h_init = 0.05
    pcoeff = 0.0
    icoeff = 1.0
    dcoeff = 0.0
    accept_safety = 0.81
    eta = 0.0
    s_noise = 1.0
    max_evaluations = 3000

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        import torch

        from nodes.samplers.flow import is_flow
        from nodes.samplers.schedules import training_schedule

        set_options(self, options)
        if self.solver_order not in (2, 3):
            raise ValueError(f"dpm_adaptive's order must be 2 or 3, got {self.solver_order}")
        if self.eta > 0 and is_flow(config):
            from nodes.families.base import ConditioningError

            raise ConditioningError("dpm_adaptive with eta above 0 adds variance-exploding noise, which makes "
                                    "no flow state: use eta 0 on flow-matching models", "sampler")
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.sigmas = sigmas.to(torch.float32).clone()
        self.schedule = training_schedule(config)
        sigma_max = float(sigmas[0])
        sigma_min = float(sigmas[-2]) if float(sigmas[-1]) == 0 and len(sigmas) > 1 else float(sigmas[-1])
        if sigma_min <= 0 or sigma_max <= 0:
            raise ValueError("dpm_adaptive needs sigmas above 0 at both ends")
        self.t_start, self.t_end = -math.log(sigma_max), -math.log(sigma_min)
        self.forward = self.t_end > self.t_start
        if self.eta > 0 and not self.forward:
            raise ValueError("dpm_adaptive with eta above 0 cannot run towards more noise")
        self.pid = _PID(abs(self.h_init) * (1 if self.forward else -1), self.pcoeff, self.icoeff, self.dcoeff,
                        1.5 if self.eta > 0 else self.solver_order, self.accept_safety)
        self.timesteps: list = []
        self.evaluations = 0
        self._s = self.t_start
        self._x: "torch.Tensor | None" = None
        self._x_prev: "torch.Tensor | None" = None
        self._eps: list["torch.Tensor"] = []
        self._stage_t = self.t_start
        self._t_next = self._t_accept = self.t_start
        self._sigma_up = 0.0
        self.n_accept = self.n_reject = 0
        self._queue(self.t_start)

    def _queue(self, t: float) -> None:
        import torch

        self._stage_t = t
        self.timesteps.append(self.schedule.timestep(torch.tensor(math.exp(-t))).to(torch.float32))

    @property
    def current_sigma(self) -> float:
        return math.exp(-self._stage_t)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas.max() ** 2 + 1) ** 0.5

    def set_begin_index(self, index: int = 0) -> None:
        pass

    def scale_model_input(self, sample: "torch.Tensor", timestep: Any = None) -> "torch.Tensor":
        return self.schedule.model_input(sample, self.current_sigma)

    def _done(self) -> bool:
        return self._s >= self.t_end - 1e-5 if self.forward else self._s <= self.t_end + 1e-5

    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor",
             generator: Any = None, return_dict: bool = True) -> StepOutput:
        import torch

        self.evaluations += 1
        sigma = self.current_sigma
        denoised = denoised_from(self.prediction_type, model_output, sample, sigma,
                                 float(getattr(self.schedule, "sigma_data", 1.0)))
        eps = (sample - denoised) / sigma
        if not self._eps:  # the first evaluation of an attempt, at s
            self._x = sample
            if self._x_prev is None:
                self._x_prev = sample
            t = min(self.t_end, self._s + self.pid.h) if self.forward else max(self.t_end, self._s + self.pid.h)
            self._t_next = self._t_accept = t
            self._sigma_up = 0.0
            if self.eta > 0:  # solve to the ancestral sigma_down; the rest of the way is fresh noise
                down = ancestral_step(math.exp(-self._s), math.exp(-t), self.eta)[0]
                self._t_next = min(self.t_end, -math.log(down)) if down > 0 else self.t_end
                self._sigma_up = math.sqrt(max(math.exp(-2 * t) - math.exp(-2 * self._t_next), 0.0))
        self._eps.append(eps)
        x, s, t = self._x, self._s, self._t_next
        h = t - s
        r1, r2 = (1 / 3, 2 / 3) if self.solver_order == 3 else (1 / 2, 1.0)
        e = self._eps
        if len(e) == 1:  # to s + r1 h, evaluated next
            s1 = s + r1 * h
            self._queue(s1)
            return StepOutput(x - math.exp(-s1) * math.expm1(r1 * h) * e[0], denoised)
        sig_t, em1 = math.exp(-t), math.expm1(h)
        if self.solver_order == 3 and len(e) == 2:  # to s + r2 h with the first correction
            s2 = s + r2 * h
            u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * e[0]
                  - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e[1] - e[0]))
            self._queue(s2)
            return StepOutput(u2, denoised)
        if self.solver_order == 3:
            x_low = x - sig_t * em1 * e[0] - sig_t / (2 * r1) * em1 * (e[1] - e[0])
            x_high = x - sig_t * em1 * e[0] - sig_t / r2 * (em1 / h - 1) * (e[2] - e[0])
        else:
            x_low = x - sig_t * em1 * e[0]
            x_high = x - sig_t * em1 * e[0] - sig_t / (2 * r1) * em1 * (e[1] - e[0])
        delta = torch.clamp(self.rtol * torch.maximum(x_low.abs(), self._x_prev.abs()), min=self.atol)
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / math.sqrt(x.numel())
        self._eps = []
        if self.pid.propose(error):
            self.n_accept += 1
            self._x_prev, self._s = x_low, self._t_accept
            x = x_high
            if self._sigma_up > 0 and self.s_noise > 0:
                x = x + randn_like(x, generator) * (self._sigma_up * self.s_noise)
        else:
            self.n_reject += 1
        if not self._done():
            if self.evaluations >= self.max_evaluations:
                raise ValueError(f"dpm_adaptive did not reach the end within {self.max_evaluations} model evaluations")
            self._queue(self._s)
        return StepOutput(x, denoised)


#: name -> stepper class, looked up by ``steppers.kiln_stepper_class``.
STEPPERS: dict[str, Any] = {"dpm_adaptive": DPMAdaptive}
