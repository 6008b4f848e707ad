"""Ancestral samplers on flow models (FLUX), as ComfyUI's rectified-flow ("RF") forms.

An ancestral step on a variance-exploding state adds fresh noise, x + sigma_up n; a flow
state (1 - t) x0 + t n has no room for that. ComfyUI's RF forms instead step to a lower
flow time t_down, then rescale the state and add noise so that it is again a flow state at
the next time t' (:func:`rf_split`). ``euler_ancestral`` does this with an Euler step;
``dpm_2_ancestral`` and ``dpmpp_2s_ancestral`` with their
second-order steps to t_down, each evaluating the model once more between t and t_down.
Fresh noise comes from each image's own generator.

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import Any

from nodes.samplers.kdiffusion import StagedStepper, randn_like


def rf_split(t: float, t_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """(t_down, keep, renoise) of a rectified-flow ancestral step from t to t_next: step to
    t_down = t_next (1 + (t_next / t - 1) eta), then x <- keep x + renoise n makes the state's
    noise level exactly t_next again (keep = (1 - t_next) / (1 - t_down))."""
    t_down = t_next * (1 + (t_next / t - 1) * eta)
    keep = (1 - t_next) / (1 - t_down)
    return t_down, keep, math.sqrt(max(t_next ** 2 - (t_down * keep) ** 2, 0.0))


def renoised(x: Any, size: float, generator: Any) -> Any:
    """``x`` plus fresh unit noise times ``size`` (none drawn at size 0: eta 0 or s_noise 0)."""
    return x + size * randn_like(x, generator) if size > 0 else x


class FlowEulerAncestral(StagedStepper):
    """ComfyUI's ``sample_euler_ancestral_RF`` (eta 1, s_noise 1 unless SamplerEulerAncestral
    sets them): from t to t' > 0, Euler to t_down, ``x = (t_down / t) x + (1 - t_down / t) x0``,
    then the RF renoise makes the state ``(1 - t') x0 + t' * (unit noise)`` again (s_noise
    scales that noise); to t' = 0 the step lands on the prediction."""

    eta = 1.0
    s_noise = 1.0

    def stage_sigmas(self, i: int) -> list[float]:
        return [float(self.sigmas[i])]

    def advance(self, i, k, t, x, denoised, generator):
        t_next = float(self.sigmas[i + 1])
        if t_next == 0:
            return denoised
        t_down, keep, renoise = rf_split(t, t_next, self.eta)
        x = (t_down / t) * x + (1 - t_down / t) * denoised
        return renoised(keep * x, renoise * self.s_noise, generator)


class _FlowAncestral(StagedStepper):
    """Two evaluations a step (one for the step to 0): the step's start and a midpoint toward
    t_down that the subclass picks; ``land`` takes the step to t_down, then the RF renoise
    (eta and s_noise as ComfyUI's Sampler* nodes set them)."""

    eta = 1.0
    s_noise = 1.0

    def stage_sigmas(self, i: int) -> list[float]:
        t, t_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if t_next == 0:
            return [t]
        return [t, self.midpoint(t, rf_split(t, t_next, self.eta)[0])]

    def advance(self, i, k, sigma, x, denoised, generator):
        t, t_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if t_next == 0:
            return denoised
        t_down, keep, renoise = rf_split(t, t_next, self.eta)
        if k == 0:
            self._x = x
            return self.to_midpoint(t, self.midpoint(t, t_down), x, denoised)
        out = self.land(t, t_down, sigma, x, denoised)  # sigma: the midpoint just evaluated
        return renoised(keep * out, renoise * self.s_noise, generator)

    def midpoint(self, t: float, t_down: float) -> float:
        raise NotImplementedError

    def to_midpoint(self, t: float, t_mid: float, x: Any, denoised: Any) -> Any:
        raise NotImplementedError

    def land(self, t: float, t_down: float, t_mid: float, x_mid: Any, denoised_mid: Any) -> Any:
        raise NotImplementedError


class FlowDPM2Ancestral(_FlowAncestral):
    """ComfyUI's ``sample_dpm_2_ancestral_RF``: DPM-Solver-2 to t_down (the midpoint at
    sqrt(t t_down), Euler to it, the midpoint's derivative for the whole step), then the RF renoise."""

    def midpoint(self, t, t_down):
        return math.sqrt(t * t_down)

    def to_midpoint(self, t, t_mid, x, denoised):
        return x + (x - denoised) / t * (t_mid - t)

    def land(self, t, t_down, t_mid, x_mid, denoised_mid):
        return self._x + (x_mid - denoised_mid) / t_mid * (t_down - t)


class FlowDPMpp2SAncestral(_FlowAncestral):
    """ComfyUI's ``sample_dpmpp_2s_ancestral_RF``: DPM-Solver++(2S) to t_down in the flow's
    half-log-SNR log((1 - t) / t) (the midpoint halfway there, 0.9999 from pure noise), each
    move a blend of the state and the prediction by the ratio of flow times, then the RF renoise."""

    def midpoint(self, t, t_down):
        if t >= 1.0:
            return 0.9999
        lam, lam_down = math.log((1 - t) / t), math.log((1 - t_down) / t_down)
        return 1 / (1 + math.exp((lam + lam_down) / 2))

    def to_midpoint(self, t, t_mid, x, denoised):
        return t_mid / t * x + (1 - t_mid / t) * denoised

    def land(self, t, t_down, t_mid, x_mid, denoised_mid):
        return t_down / t * self._x + (1 - t_down / t) * denoised_mid


#: name -> the flow stepper class of a sampler whose SD form draws variance-exploding noise.
FLOW_STEPPERS: dict[str, Any] = {"euler_ancestral": FlowEulerAncestral, "dpm_2_ancestral": FlowDPM2Ancestral,
                                 "dpmpp_2s_ancestral": FlowDPMpp2SAncestral}
