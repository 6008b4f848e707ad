"""Deterministic samplers of ComfyUI's list that diffusers has no scheduler for, as Kiln
steppers over a sigma list: ``heunpp2``, ``ipndm_v``, ``gradient_estimation`` (and its
CFG++ form), ``dpmpp_2m_cfg_pp``, ``res_multistep_cfg_pp`` and ``exp_heun_2_x0``; and the
Adams-Bashforth forms of ``deis`` and ``lms`` and the ``dpm_2`` stepper that flow models
run (diffusers' classes run them on SD).

They work in the k-diffusion parameterisation of ``kdiffusion.py`` (state x0 + sigma eps,
the derivative d = (x - x0) / sigma); the CFG++ forms receive the unguided prediction
through ``kdiffusion.CFGPP``. Each is written from its method's definition; where Kiln's
arithmetic differs from ComfyUI's on purpose, the class says so.

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from nodes.samplers.kdiffusion import CFGPP, ResMultistep, SigmaStepper, StagedStepper
from nodes.samplers.stochastic import ExpHeun2X0SDE

if TYPE_CHECKING:
    import torch


class HeunPP2(StagedStepper):
    """Heun++ (ComfyUI's ``heunpp2``): each step looks two grid points ahead with Euler
    predictions, evaluates the model there, and steps with a weighted mean of the three
    derivatives whose weights grow with the noise level (w_k = sigma_k / (3 sigma_first)
    for the two look-aheads, the rest on the step's own derivative). With one point left
    ahead the step is Heun's with w = sigma_next / (2 sigma_first); the last step is Euler.
    Three model evaluations per step."""

    def stage_sigmas(self, i: int) -> list[float]:
        end = float(self.sigmas[-1])
        ahead = [float(s) for s in self.sigmas[i + 1:i + 3]]
        points = [float(self.sigmas[i])]
        if ahead[0] != end:
            points += ahead[:1] if ahead[1] == end else ahead
        return points

    def advance(self, i, k, sigma, x, denoised, generator):
        points = self.stage_sigmas(i)
        d = (x - denoised) / sigma
        if k == 0:
            self._x, self._d = x, [d]
        else:
            self._d.append(d)
        dt = float(self.sigmas[i + 1]) - points[0]
        if k + 1 < len(points):  # an Euler prediction to the next look-ahead point
            return x + d * (points[k + 1] - sigma)
        if len(points) == 1:
            return x + d * dt
        first = float(self.sigmas[0])
        weights = [s / (len(points) * first) for s in points[1:]]
        mean = (1 - sum(weights)) * self._d[0]
        for w, dk in zip(weights, self._d[1:]):
            mean = mean + w * dk
        return self._x + mean * dt


def adams_bashforth_weights(points: list[float], target: float) -> list[float]:
    """Variable-step Adams-Bashforth: the weights w_j, for derivatives taken at ``points``
    (newest first), such that x(target) = x(points[0]) + (target - points[0]) * sum w_j d_j
    integrates their Lagrange interpolant exactly. On an even grid these are the classic
    coefficients (55, -59, 37, -9) / 24 at fourth order."""
    h = target - points[0]
    weights = []
    for j, pj in enumerate(points):
        coeffs = [1.0]  # the basis polynomial, lowest power first
        for m, pm in enumerate(points):
            if m != j:
                scale = 1.0 / (pj - pm)
                coeffs = [(a * -pm + b) * scale for a, b in zip(coeffs + [0.0], [0.0] + coeffs)]
        integral = sum(c * (target ** (p + 1) - points[0] ** (p + 1)) / (p + 1) for p, c in enumerate(coeffs))
        weights.append(integral / h)
    return weights


class DPM2(StagedStepper):
    """k-diffusion's DPM-Solver-2 sampler (``dpm_2``): each step evaluates once more at the
    log-midpoint sqrt(sigma sigma_next) from an Euler half step, then steps with that
    derivative; the step to 0 is Euler's. diffusers' KDPM2DiscreteScheduler is the same
    method, which SD runs; this one runs on flow models."""

    def stage_sigmas(self, i: int) -> list[float]:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        return [sigma] if sigma_next == 0 else [sigma, (sigma * sigma_next) ** 0.5]

    def advance(self, i, k, sigma, x, denoised, generator):
        start, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if k == 0:
            self._x = x
            d = (x - denoised) / sigma
            if sigma_next == 0:
                return x + d * (sigma_next - sigma)
            return x + d * ((sigma * sigma_next) ** 0.5 - sigma)  # to the midpoint, evaluated next
        return self._x + (x - denoised) / sigma * (sigma_next - start)  # sigma: the midpoint


class AdamsBashforth(SigmaStepper):
    """Variable-step Adams-Bashforth on the derivative d = (x - x0) / sigma, up to
    ``max_order`` from the previous steps' derivatives (:func:`adams_bashforth_weights`).
    With ``lands_on_prediction`` the step to 0 is the prediction itself; without, that step
    integrates the polynomial too. Three of ComfyUI's samplers are this method:"""

    max_order = 4
    lands_on_prediction = True

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, sigmas, **options)
        self._history: list["torch.Tensor"] = []  # newest last

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        d = (x - denoised) / sigma
        history = self._history[max(0, len(self._history) - (self.max_order - 1)):] if self.max_order > 1 else []
        self._history = history + [d]
        if sigma_next == 0 and self.lands_on_prediction:
            return denoised
        derivatives = [d] + history[::-1]
        points = [float(self.sigmas[i - j]) for j in range(len(derivatives))]
        weights = adams_bashforth_weights(points, sigma_next)
        step = sum(w * dk for w, dk in zip(weights, derivatives))
        return x + (sigma_next - sigma) * step


class IPNDMV(AdamsBashforth):
    """Variable-step iPNDM (ComfyUI's ``ipndm_v``): fourth order, the last step to 0 landing
    on the prediction.

    Deliberate difference: Kiln integrates the interpolating polynomial exactly (Adams-
    Bashforth). ComfyUI's ``ipndm_v`` takes its weights from the iPNDM-v code it credits:
    the same at second order, another third-order rule on uneven grids, and at fourth order
    (57, -65, 43, -11) / 24 even on an even grid, where Adams-Bashforth's are
    (55, -59, 37, -9) / 24. So Kiln's ``ipndm_v`` pixels differ slightly from ComfyUI's.
    """


class DEISTab(AdamsBashforth):
    """ComfyUI's own ``deis`` (its default "tab" mode, third order): the same Lagrange
    integrals, which ComfyUI sums numerically. Kiln runs it on flow models (FLUX); on SD
    ``deis`` is diffusers' DEISMultistepScheduler (diffusers' parameterisation, for parity
    with diffusers' pipelines)."""

    max_order = 3


class LMS(AdamsBashforth):
    """k-diffusion's ``lms`` (fourth order, integrating to 0 as well), which diffusers'
    LMSDiscreteScheduler also is: Kiln runs this one on flow models (FLUX), diffusers' on SD."""

    lands_on_prediction = False


class GradientEstimation(SigmaStepper):
    """Gradient estimation (Permenter and Yuan 2024, "Interpreting and Improving Diffusion
    Models from an Optimization Perspective"; ComfyUI's ``gradient_estimation``, gamma 2):
    an Euler step plus (gamma - 1) times the change of the derivative since the last step,
    which cancels part of the denoiser's error. The last step lands on the prediction. The
    CFG++ form steps along the unguided prediction from the guided one."""

    gamma = 2.0

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, sigmas, **options)
        self._old_d: "torch.Tensor | None" = None

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        plain = denoised if self._unguided is None else self._unguided
        d = (x - plain) / sigma
        old, self._old_d = self._old_d, d
        if sigma_next == 0:
            return denoised
        out = denoised + d * sigma_next
        if old is not None:
            out = out + (self.gamma - 1) * (d - old) * (sigma_next - sigma)
        return out


class GradientEstimationCFGPP(CFGPP, GradientEstimation):
    """ComfyUI's ``gradient_estimation_cfg_pp``."""


class DPMpp2MCFGPP(CFGPP, SigmaStepper):
    """CFG++ DPM-Solver++(2M) (ComfyUI's ``dpmpp_2m_cfg_pp``): the exponential step in
    t = -log(sigma) lands on the guided prediction and renoises along the unguided one,
    with the second-order correction from the previous unguided prediction. Without an
    unguided output (no guidance) it is DPM-Solver++(2M)."""

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, sigmas, **options)
        self._old: "torch.Tensor | None" = None

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        plain = denoised if self._unguided is None else self._unguided
        old, self._old = self._old, plain
        if sigma_next == 0:
            return denoised
        decay = sigma_next / sigma  # e^-h with h = log(sigma / sigma_next)
        out = denoised + decay * (x - plain)
        if old is not None:
            h = math.log(sigma / sigma_next)
            r = math.log(float(self.sigmas[i - 1]) / sigma) / h
            out = out - math.expm1(-h) / (2 * r) * (denoised - old)
        return out


class ResMultistepCFGPP(CFGPP, ResMultistep):
    """ComfyUI's ``res_multistep_cfg_pp``: the RES multistep (eta 0) stepping along the
    unguided prediction (the math is ``kdiffusion.ResMultistep``'s)."""


class ExpHeun2X0(ExpHeun2X0SDE):
    """ComfyUI's ``exp_heun_2_x0``: the exponential Heun step in data prediction and log-SNR
    time of ``exp_heun_2_x0_sde`` without its noise (eta 0): two evaluations per step."""

    eta = 0.0
    s_noise = 0.0


#: name -> stepper class, looked up by ``steppers.kiln_stepper_class``.
STEPPERS: dict[str, Any] = {"heunpp2": HeunPP2, "ipndm_v": IPNDMV, "gradient_estimation": GradientEstimation,
                            "gradient_estimation_cfg_pp": GradientEstimationCFGPP, "dpmpp_2m_cfg_pp": DPMpp2MCFGPP,
                            "res_multistep_cfg_pp": ResMultistepCFGPP, "exp_heun_2_x0": ExpHeun2X0, "deis": DEISTab,
                            "lms": LMS, "dpm_2": DPM2}
