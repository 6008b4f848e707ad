"""DPM-Solver++ SDE samplers with the settings of ComfyUI's Sampler* nodes.

KSampler's ``dpmpp_sde`` and ``dpmpp_2m_sde`` (midpoint and heun) run diffusers'
schedulers (parity with diffusers' pipelines), which have no ``eta``, ``s_noise`` or
``r``. ComfyUI's SamplerDPMPP_SDE and SamplerDPMPP_2M_SDE set them, so these steppers
run a changed setting: ComfyUI's published algorithms (``sample_dpmpp_sde``,
``sample_dpmpp_2m_sde``), whose defaults (eta 1, s_noise 1, r 1/2) are the diffusers
methods again. ``dpmpp_3m_sde`` always runs here (:class:`DPMpp3MSDE` says why).

They step in the half-log-SNR lambda = log(alpha / sigma) of the model's training
schedule with the clean latent's weight alpha, so one form serves SD (alpha = 1,
lambda = -log(sigma)) and flow models (alpha = 1 - t, ComfyUI's flow forms, the first
level t = 1 taken just below pure noise). eta scales the SDE's stochasticity (0: the
deterministic DPM-Solver++ of the same order), s_noise the fresh noise alone.

Fresh noise: ComfyUI draws it from a Brownian tree; Kiln draws independent standard
normals from each image's generator (a batch item equals its single run with seed + i).
For the multistep ones one draw covers one step, which is what a Brownian increment
over that step is; ``dpmpp_sde``'s two draws in a step are independent here where
ComfyUI's tree correlates them.

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from nodes.samplers.kdiffusion import SigmaStepper, StagedStepper, ancestral_step, randn_like
from nodes.samplers.stochastic import below_pure_noise

if TYPE_CHECKING:
    import torch


def _phi_2(h_eta: float) -> float:
    """1 + (e^-h - 1) / h: the weight of the first divided difference in an exponential step."""
    return math.expm1(-h_eta) / h_eta + 1


class _MultistepSDE(SigmaStepper):
    """The shared first-order part of DPM-Solver++(2M/3M) SDE: decay the state by
    sigma'/sigma * e^(-eta h), add (1 - e^(-(1 + eta) h)) alpha' times the prediction, let
    the subclass add its history terms, then fresh noise sigma' sqrt(1 - e^(-2 eta h)) s_noise.
    The step to 0 lands on the prediction."""

    eta = 1.0
    s_noise = 1.0

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, below_pure_noise(config, sigmas), **options)
        self._preds: list["torch.Tensor"] = []  # newest first
        self._steps: list[float] = []  # the previous steps' h, newest first

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        preds, steps = self._preds, self._steps
        self._preds = [denoised, *preds][:2]
        if sigma_next == 0:
            return denoised
        h = self.schedule.half_log_snr(sigma_next) - self.schedule.half_log_snr(sigma)
        self._steps = [h, *steps][:2]
        h_eta = h * (self.eta + 1)
        alpha_next = self.schedule.alpha(sigma_next)
        out = sigma_next / sigma * math.exp(-h * self.eta) * x - alpha_next * math.expm1(-h_eta) * denoised
        out = out + alpha_next * self.history(h, h_eta, denoised, preds, steps)
        if self.eta > 0 and self.s_noise > 0:
            out = out + randn_like(out, generator) * (
                sigma_next * math.sqrt(-math.expm1(-2 * h * self.eta)) * self.s_noise)
        return out

    def history(self, h: float, h_eta: float, denoised: "torch.Tensor", preds: list, steps: list[float]) -> Any:
        raise NotImplementedError


class DPMpp2MSDE(_MultistepSDE):
    """DPM-Solver++(2M) SDE (ComfyUI's ``sample_dpmpp_2m_sde``): the second-order term from
    the previous prediction, weighted for the ``midpoint`` or the ``heun`` solver."""

    solver_type = "midpoint"

    def history(self, h, h_eta, denoised, preds, steps):
        if not preds or not steps:
            return 0.0
        difference = (denoised - preds[0]) * (h / steps[0])  # (1 / r) (D - D_prev), r = h_prev / h
        if self.solver_type == "heun":
            return _phi_2(h_eta) * difference
        return -0.5 * math.expm1(-h_eta) * difference


class DPMpp2MSDEHeun(DPMpp2MSDE):
    """``dpmpp_2m_sde_heun``: DPM-Solver++(2M) SDE with the heun weight."""

    solver_type = "heun"


class DPMpp3MSDE(_MultistepSDE):
    """DPM-Solver++(3M) SDE (ComfyUI's ``sample_dpmpp_3m_sde``): the second- and third-order
    terms from the two previous predictions (second order while only one is known).

    Kiln runs this one for ``dpmpp_3m_sde`` at every setting, not diffusers'
    DPMSolverMultistepScheduler: the SDE's prediction integral gives the second divided
    difference D2 the weight (1 - e^(-2h) - 2h) / (2h)^2 + 1/2 (as here and in ComfyUI),
    while diffusers' third-order SDE update has - 1/2, which leaves its samples too spread
    (on Gaussian data of std 0.8: 0.92 at 16 Karras steps, against 0.82 here)."""

    def history(self, h, h_eta, denoised, preds, steps):
        if not preds or not steps:
            return 0.0
        phi_2 = _phi_2(h_eta)
        d1_0 = (denoised - preds[0]) * (h / steps[0])
        if len(preds) < 2 or len(steps) < 2:
            return phi_2 * d1_0
        r0, r1 = steps[0] / h, steps[1] / h
        d1_1 = (preds[0] - preds[1]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        return phi_2 * d1 - phi_3 * d2


class DPMppSDE(StagedStepper):
    """DPM-Solver++ SDE (ComfyUI's ``sample_dpmpp_sde``): each step evaluates the model at
    the start and at the fraction ``r`` of the step in half-log-SNR, each stage an
    ancestral exponential step (to its sigma_down, then noise of its sigma_up times
    s_noise), the second combining the two predictions with weights 1 - 1/(2r) and 1/(2r).
    The step to 0 lands on the first prediction."""

    eta = 1.0
    s_noise = 1.0
    r = 0.5

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, below_pure_noise(config, sigmas), **options)
        self._x: "torch.Tensor | None" = None
        self._first: "torch.Tensor | None" = None

    def stage_sigmas(self, i: int) -> list[float]:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if sigma_next == 0:
            return [sigma]
        return [sigma, self._middle(sigma, sigma_next)]

    def _middle(self, sigma: float, sigma_next: float) -> float:
        """The level the fraction r of the way from sigma to sigma_next in half-log-SNR."""
        lam = self.schedule.half_log_snr(sigma)
        return self.schedule.sigma_at_half_log_snr(lam + self.r * (self.schedule.half_log_snr(sigma_next) - lam))

    def _ancestral(self, x: "torch.Tensor", sigma: float, sigma_to: float, prediction: "torch.Tensor",
                   generator: Any) -> "torch.Tensor":
        """From ``x`` at sigma towards sigma_to: the exponential step to the ancestral
        sigma_down (taken in sigma / alpha), then the fresh noise of its sigma_up."""
        alpha, alpha_to = self.schedule.alpha(sigma), self.schedule.alpha(sigma_to)
        ratio, ratio_to = sigma / alpha, sigma_to / alpha_to  # e^-lambda at each end
        down, up = ancestral_step(ratio, ratio_to, self.eta)
        decay = down / ratio  # e^-(lambda_down - lambda)
        out = (alpha_to / alpha) * decay * x + alpha_to * (1 - decay) * prediction
        if up > 0 and self.s_noise > 0:
            out = out + randn_like(out, generator) * (alpha_to * up * self.s_noise)
        return out

    def advance(self, i, k, stage_sigma, x, denoised, generator):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if sigma_next == 0:
            return denoised
        if k == 0:
            self._x, self._first = x, denoised
            return self._ancestral(x, sigma, self._middle(sigma, sigma_next), denoised, generator)
        fac = 1 / (2 * self.r)
        combined = (1 - fac) * self._first + fac * denoised
        return self._ancestral(self._x, sigma, sigma_next, combined, generator)


#: name -> stepper class, looked up by ``steppers.kiln_stepper_class``.
STEPPERS: dict[str, Any] = {
    "dpmpp_sde": DPMppSDE,
    "dpmpp_2m_sde": DPMpp2MSDE,
    "dpmpp_2m_sde_heun": DPMpp2MSDEHeun,
    "dpmpp_3m_sde": DPMpp3MSDE,
}
