"""Stochastic samplers of ComfyUI's list that diffusers has no scheduler for.

Each class is ComfyUI's published algorithm (``comfy/k_diffusion/sampling.py``,
``comfy/k_diffusion/sa_solver.py``) with the defaults ComfyUI's KSampler binds to
the name, rewritten as a Kiln sigma-space stepper (see ``kdiffusion.py``: state
x = x0 + sigma * eps, model input x / sqrt(sigma^2 + 1)). ER-SDE, SEEDS and SA-Solver
read the half-log-SNR and the clean latent's weight alpha from the model's training
schedule (on SD alpha = 1 and lambda = -log(sigma), what ComfyUI's VP-data-prediction
formulas reduce to), so they also run on flow models in ComfyUI's flow forms; the
ancestral RES and the stochastic CFG++ forms are variance-exploding only (``flow.py``
refuses them on flow models).

Fresh noise: ComfyUI's KSampler draws these samplers' noise from
``default_noise_sampler`` (independent standard normals per call, one generator for
the batch). Kiln draws the same independent standard normals, scaled the same way,
from each image's own generator (``kdiffusion.randn_like``), so a batch item equals
its single run with seed + i; the noise is therefore not byte-equal to ComfyUI's.

Samplers that evaluate the model more than once per step lay their evaluations out
up front (``stages``: step, stage, sigma the model sees), like DPMpp2SAncestral, so
the loop calls ``step`` once per model evaluation. CFG++ variants take the unguided
network output as ``uncond=`` in ``step``, as EulerCFGPP does.

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from nodes.samplers.kdiffusion import CFGPP, ResMultistep, SigmaStepper, StagedStepper, randn_like
from nodes.samplers.steppers import DPMpp2SAncestral

if TYPE_CHECKING:
    import torch


class ResMultistepAncestral(ResMultistep):
    """ComfyUI's ``res_multistep_ancestral``: RES second-order multistep with eta = 1,
    s_noise = 1 (the math is ``kdiffusion.ResMultistep``'s; this only sets eta)."""

    eta = 1.0


class ResMultistepAncestralCFGPP(CFGPP, ResMultistepAncestral):
    """ComfyUI's ``res_multistep_ancestral_cfg_pp``: the ancestral RES multistep stepping
    along the unguided prediction (CFG++), eta = 1."""


class DPMpp2SAncestralCFGPP(CFGPP, DPMpp2SAncestral):
    """ComfyUI's ``dpmpp_2s_ancestral_cfg_pp`` (eta = 1, s_noise = 1): DPM-Solver++(2S)
    ancestral whose exponential steps start from x + (guided - unguided).

    As in ComfyUI, the second stage's shift pairs the first stage's guided prediction
    with the unguided prediction of the midpoint evaluation (ComfyUI keeps only the
    latest unguided output); the math is ``steppers.DPMpp2SAncestral``'s."""


def below_pure_noise(config: Mapping[str, Any], sigmas: "torch.Tensor") -> "torch.Tensor":
    """A flow run's list with its first level t = 1 (no signal: an infinite noise-to-signal
    ratio) taken at 1 - 1e-4, as ComfyUI's flow forms take it; any other list as it is."""
    from nodes.samplers.flow import is_flow

    if not is_flow(config) or float(sigmas[0]) < 1.0:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = 1.0 - 1e-4
    return sigmas


class ERSDE(SigmaStepper):
    """ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169) as ComfyUI's ``er_sde`` with its
    defaults (s_noise 1, max_stage 3, noise scaler f(x) = x (e^(x^0.3) + 10)).

    Each step goes from sigma to sigma_next along the extended reverse-time SDE whose
    noise is shaped by the scaler: the first-order part mixes the state and the
    prediction by r = f(sigma_next) / f(sigma); from the second (third) step on, the
    first (second) divided difference of the predictions adds its term, with the
    integrals of 1/f (and (lambda - sigma)/f) over the step taken as ComfyUI does, a
    200-point Riemann sum; then fresh noise of size sqrt(sigma_next^2 - sigma^2 r^2).
    The solver works in lambda = sigma / alpha, the state's noise-to-signal ratio, with
    alpha the clean latent's weight (the training schedule's ``alpha``): on SD alpha = 1 and
    lambda = sigma; on a flow model alpha = 1 - t, ComfyUI's flow form, whose first level
    t = 1 (no signal at all) is taken at 1 - 1e-4 as ComfyUI's is. The last step to 0 lands
    on the prediction.
    """

    max_stage = 3
    integration_points = 200
    #: SamplerER_SDE's choice: "ER-SDE" (this noise scaler), "Reverse-time SDE" (f(x) =
    #: x^(eta + 1)) or "ODE" (f(x) = x and no noise: a deterministic first-to-third order solver).
    solver_type = "ER-SDE"
    eta = 1.0
    s_noise = 1.0

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, below_pure_noise(config, sigmas), **options)
        self._old: "torch.Tensor | None" = None
        self._old_d: "torch.Tensor | None" = None
        self._held = 0  # predictions seen so far: how many stages the history allows

    def _lam(self, i: int) -> float:
        sigma = float(self.sigmas[i])
        return sigma / self.schedule.alpha(sigma)

    def noise_scaler(self, value: float) -> float:
        if self.solver_type == "ER-SDE":
            return value * (math.exp(value ** 0.3) + 10.0)
        return value ** (1.0 if self.solver_type == "ODE" else self.eta + 1.0)

    def update(self, i, x, denoised, sigma, sigma_next, generator):
        old, self._old = self._old, denoised
        self._held += 1
        if sigma_next == 0:
            return denoised
        stage = min(self.max_stage, self._held)
        f = self.noise_scaler
        alpha, alpha_next = self.schedule.alpha(sigma), self.schedule.alpha(sigma_next)
        lam, lam_next = self._lam(i), self._lam(i + 1)
        r = f(lam_next) / f(lam)
        out = alpha_next / alpha * r * x + alpha_next * (1 - r) * denoised
        if stage >= 2:
            dt = lam_next - lam
            width = -dt / self.integration_points
            points = [lam_next + k * width for k in range(self.integration_points)]
            scaled = [f(p) for p in points]
            d = (denoised - old) / (lam - self._lam(i - 1))
            out = out + alpha_next * (dt + sum(1 / v for v in scaled) * width * f(lam_next)) * d
            if stage >= 3:
                moment = sum((p - lam) / v for p, v in zip(points, scaled)) * width
                u = (d - self._old_d) / ((lam - self._lam(i - 2)) / 2)
                out = out + alpha_next * (dt ** 2 / 2 + moment * f(lam_next)) * u
            self._old_d = d
        spread = lam_next ** 2 - lam ** 2 * r ** 2
        if spread > 0 and self.s_noise > 0 and self.solver_type != "ODE":
            out = out + randn_like(out, generator) * (alpha_next * math.sqrt(spread) * self.s_noise)
        return out


def _h_phi_2(z: float) -> float:
    """h * phi_2(h) of exponential integrators, (e^z - 1 - z) / z, at z = -h."""
    return (math.expm1(z) - z) / z


class SEEDS(StagedStepper):
    """SEEDS (Gonzalez et al. 2023, arXiv 2305.14267): stochastic explicit exponential
    derivative-free solvers in data prediction, as ComfyUI's ``seeds_2`` (stages at
    fraction r = 1/2 of the step in lambda = -log(sigma)) and ``seeds_3`` (1/3, 2/3),
    with ComfyUI's defaults eta = 1, s_noise = 1.

    Each stage goes from sigma along the SDE with h_eta = (1 + eta) h to its own sigma,
    combining the predictions so far with exponential-integrator weights; the noise of
    one step is one Brownian path: each stage decays the previous stage's noise by
    e^(-eta dh) and adds the fresh part sqrt(1 - e^(-2 eta dh)), times the stage's sigma.
    The last step to 0 lands on the first prediction (one evaluation). Time is the
    half-log-SNR lambda = log(alpha / sigma) of the model's training schedule and the
    prediction terms carry the clean latent's weight alpha, so the same steps serve SD
    (alpha = 1) and flow models (alpha = 1 - t, ComfyUI's flow form).
    """

    fractions: tuple[float, ...] = (0.5,)
    eta = 1.0
    s_noise = 1.0
    #: seeds_2's last stage: "phi_1" weights lerp(D0, D1, 1/(2r)) by e^-h_eta - 1 (ComfyUI's
    #: default); "phi_2" is the second-order split that exp_heun_2_x0 uses.
    solver_type = "phi_1"

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        super().__init__(config, below_pure_noise(config, sigmas), **options)
        self._x: "torch.Tensor | None" = None  # the state at the step's start
        self._preds: list["torch.Tensor"] = []  # this step's predictions, one per stage so far
        self._noise: "torch.Tensor | None" = None  # this step's Brownian noise so far (unit scale)

    def stage_sigmas(self, i: int) -> list[float]:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if sigma_next == 0:
            return [sigma]
        return [sigma] + [self._sigma_at(sigma, sigma_next, r) for r in self.fractions]

    def _sigma_at(self, sigma: float, sigma_next: float, r: float) -> float:
        """The level a fraction ``r`` of the way from sigma to sigma_next in half-log-SNR."""
        lam, lam_next = self.schedule.half_log_snr(sigma), self.schedule.half_log_snr(sigma_next)
        return self.schedule.sigma_at_half_log_snr((1 - r) * lam + r * lam_next)

    def advance(self, i, k, stage_sigma, x, denoised, generator):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if sigma_next == 0:
            return denoised
        if k == 0:
            self._x, self._preds, self._noise = x, [], None
        self._preds.append(denoised)
        h = self.schedule.half_log_snr(sigma_next) - self.schedule.half_log_snr(sigma)
        ends = (0.0, *self.fractions, 1.0)
        c = ends[k + 1]
        sigma_to = self._sigma_at(sigma, sigma_next, c)
        out = sigma_to / sigma * math.exp(-c * h * self.eta) * self._x
        out = out - self.schedule.alpha(sigma_to) * self._combination(k, h * (1 + self.eta))
        return self._add_noise(out, (c - ends[k]) * h, sigma_to, generator)

    def _combination(self, k: int, h_eta: float) -> "torch.Tensor":
        """The prediction term of stage ``k`` (subtracted from the decayed state)."""
        d = self._preds
        r = self.fractions
        if k == 0:
            return math.expm1(-r[0] * h_eta) * d[0]
        if len(r) == 1:  # SEEDS-2's last stage
            if self.solver_type == "phi_2":
                b2 = _h_phi_2(-h_eta) / r[0]
                return (math.expm1(-h_eta) - b2) * d[0] + b2 * d[1]
            fac = 1 / (2 * r[0])
            return math.expm1(-h_eta) * (d[0] + fac * (d[1] - d[0]))
        if k == 1:  # SEEDS-3's second stage
            a2 = r[1] / r[0] * _h_phi_2(-r[1] * h_eta)
            return (math.expm1(-r[1] * h_eta) - a2) * d[0] + a2 * d[1]
        b3 = _h_phi_2(-h_eta) / r[1]
        return (math.expm1(-h_eta) - b3) * d[0] + b3 * d[2]

    def _add_noise(self, out: "torch.Tensor", dh: float, sigma_to: float, generator: Any) -> "torch.Tensor":
        if self.eta <= 0 or self.s_noise <= 0:
            return out
        fresh = math.sqrt(-math.expm1(-2 * self.eta * dh))
        noise = None if self._noise is None else self._noise * math.exp(-self.eta * dh)
        if fresh > 0:
            z = randn_like(out, generator) * fresh
            noise = z if noise is None else noise + z
        self._noise = noise
        return out if noise is None else out + noise * (sigma_to * self.s_noise)


class SEEDS3(SEEDS):
    """ComfyUI's ``seeds_3``: SEEDS with stages at 1/3 and 2/3 of each step (three evaluations)."""

    fractions = (1 / 3, 2 / 3)


class ExpHeun2X0SDE(SEEDS):
    """ComfyUI's ``exp_heun_2_x0_sde``: SEEDS-2 with its stage at the step's end (r = 1) and
    the second-order ("phi_2") last stage, eta = 1, s_noise = 1: an exponential Heun step in
    data prediction and log-SNR time. Both stages end at sigma_next and share one noise draw
    (the second segment has length 0, so it adds no fresh noise)."""

    fractions = (1.0,)
    solver_type = "phi_2"


def _stochastic_adams_weights(lambdas: list[float], lam_s: float, lam_t: float, tau: float) -> list[float]:
    """SA-Solver's b coefficients (its eqs. 15 and 18, data prediction, before the clean
    latent's weight alpha_t that the caller applies):
    the integral from lam_s to lam_t of (1 + tau^2) e^((1 + tau^2)(l - lam_t)) times each
    Lagrange basis polynomial through ``lambdas``. The moments of the exponential weight
    come from integrating by parts; the basis integrals from the Vandermonde system."""
    import torch

    n = len(lambdas)
    c = 1 + tau ** 2
    h = lam_t - lam_s
    ends = [lam_t ** p - lam_s ** p * math.exp(-c * h) for p in range(n)]
    moments = [sum((-1) ** (p - q) * math.factorial(p) / math.factorial(q) * c ** -(p - q) * ends[q]
                   for q in range(p + 1)) for p in range(n)]
    vandermonde = torch.tensor([[lam ** p for lam in lambdas] for p in range(n)], dtype=torch.float64)
    return torch.linalg.solve(vandermonde, torch.tensor(moments, dtype=torch.float64)).tolist()


def _simple_order_2_weights(lambdas: list[float], lam_s: float, lam_t: float, tau: float,
                            corrector: bool) -> list[float]:
    """SA-Solver's simpler order-2 coefficients (its Appendix D; ComfyUI's ``simple_order_2``),
    oldest prediction first: a trapezoid-like corrector, and a predictor whose second
    weight is the step's half-square over the previous interval."""
    c = 1 + tau ** 2
    h = lam_t - lam_s
    whole = -math.expm1(-c * h)
    if corrector:
        newer = 0.5 * c * h
        return [whole - newer, newer]
    older = 0.5 * c * h ** 2 / (lambdas[0] - lam_s)
    return [older, whole - older]


class SASolver(StagedStepper):
    """SA-Solver (Xue et al. 2023, arXiv 2309.05019), ComfyUI's ``sa_solver`` with the
    defaults its KSampler binds: predictor order 3, corrector order 4, s_noise 1, and
    stochasticity tau = 1 for sigmas between the model's sigma at 80% and at 20% of
    the schedule (ComfyUI's ``percent_to_sigma(0.2)`` and ``(0.8)``), 0 outside.

    Each step corrects the state the previous step predicted (stochastic Adams-Moulton
    over the predictions up to this one, reusing the predictor's noise), then predicts
    the next state (stochastic Adams-Bashforth) and adds fresh noise of size
    sigma_next * sqrt(1 - e^(-2 tau^2 h)). Orders are lowered at the start (history)
    and, on a list ending at 0, towards the end, as ComfyUI does; the step to 0 lands on
    the prediction. ``pece`` (``sa_solver_pece``) evaluates the corrected state again
    before predicting: two evaluations at each sigma after the first.

    Time is the half-log-SNR of the model's training schedule and the prediction terms carry
    the clean latent's weight alpha, so the same steps serve SD (alpha = 1, lambda =
    -log(sigma)) and flow models (alpha = 1 - t, ComfyUI's flow form, its first level t = 1
    taken at 1 - 1e-4).

    Deliberate difference: on a list that ends above 0 (e.g. KSamplerAdvanced's leftover
    noise) Kiln returns the state predicted at the list's last sigma; ComfyUI's function
    returns the corrected state one sigma earlier.
    """

    pece = False
    predictor_order = 3
    corrector_order = 4
    #: SamplerSASolver's settings: tau (``eta``) between the sigmas at these fractions of the
    #: schedule (0 outside), the noise's scale, and the paper's simpler order-2 coefficients.
    eta = 1.0
    sde_start_percent = 0.2
    sde_end_percent = 0.8
    s_noise = 1.0
    simple_order_2 = False

    def __init__(self, config: Mapping[str, Any], sigmas: "torch.Tensor", **options: Any) -> None:
        from nodes.samplers.schedules import percent_to_sigma

        super().__init__(config, below_pure_noise(config, sigmas), **options)
        self.tau_range = (percent_to_sigma(self.schedule, self.sde_end_percent),
                          percent_to_sigma(self.schedule, self.sde_start_percent))  # (low, high)
        self.lambdas = [self.schedule.half_log_snr(s) if s > 0 else math.inf for s in self.sigmas.tolist()]
        self._to_end = float(self.sigmas[-1]) == 0
        self._preds: list["torch.Tensor"] = []
        self._x: "torch.Tensor | None" = None
        self._noise: "torch.Tensor | None" = None
        self._tau = self._h = 0.0
        self._predictor_used = 0

    def stage_sigmas(self, i: int) -> list[float]:
        sigma = float(self.sigmas[i])
        return [sigma, sigma] if self.pece and self.corrector_order > 0 and i > 0 else [sigma]

    def tau(self, sigma: float) -> float:
        low, high = self.tau_range
        return self.eta if self.eta > 0 and low <= sigma <= high else 0.0

    def _weights(self, i: int, order: int, end: int, tau: float, corrector: bool) -> list[float]:
        """The b coefficients over the last ``order`` predictions up to step ``i``'s, for the move
        from level end - 1 to level ``end``, times the clean latent's weight there (1 on SD)."""
        lambdas, lam_s, lam_t = self.lambdas[i - order + 1:i + 1], self.lambdas[end - 1], self.lambdas[end]
        if self.simple_order_2 and order == 2:
            weights = _simple_order_2_weights(lambdas, lam_s, lam_t, tau, corrector)
        else:
            weights = _stochastic_adams_weights(lambdas, lam_s, lam_t, tau)
        alpha = self.schedule.alpha(float(self.sigmas[end]))
        return [alpha * w for w in weights]

    def _weighted(self, weights: list[float]) -> "torch.Tensor":
        preds = self._preds[-len(weights):]
        total = preds[0] * weights[0]
        for w, d in zip(weights[1:], preds[1:]):
            total = total + w * d
        return total

    def advance(self, i, k, stage_sigma, x, denoised, generator):
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if k == 1:  # PECE: the corrected state evaluated again
            self._preds[-1] = denoised
            return self._predict(i, self._predictor_used, denoised, generator)
        self._preds.append(denoised)
        del self._preds[:-max(self.predictor_order, self.corrector_order)]
        held = len(self._preds)
        predictor = min(self.predictor_order, held)
        corrector = 0 if i == 0 or (sigma_next == 0 and not self.pece) else min(self.corrector_order, held)
        if self._to_end:
            predictor = min(predictor, len(self.sigmas) - 2 - i)
            corrector = min(corrector, len(self.sigmas) - 1 - i)
        if corrector == 0:
            self._x = x
        else:
            weights = self._weights(i, corrector, i, self._tau, corrector=True)
            self._x = (sigma / float(self.sigmas[i - 1]) * math.exp(-self._tau ** 2 * self._h) * self._x
                       + self._weighted(weights))
            if self._tau > 0 and self._noise is not None:
                self._x = self._x + self._noise
            if self.pece:
                self._predictor_used = predictor
                return self._x
        return self._predict(i, predictor, denoised, generator)

    def _predict(self, i: int, order: int, denoised: "torch.Tensor", generator: Any) -> "torch.Tensor":
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if sigma_next == 0:
            return denoised
        lam = self.lambdas
        self._tau = tau = self.tau(sigma_next)
        self._h = h = lam[i + 1] - lam[i]
        weights = self._weights(i, order, i + 1, tau, corrector=False)
        out = sigma_next / sigma * math.exp(-tau ** 2 * h) * self._x + self._weighted(weights)
        self._noise = None
        if tau > 0 and self.s_noise > 0:
            self._noise = randn_like(out, generator) * (
                sigma_next * math.sqrt(-math.expm1(-2 * tau ** 2 * h)) * self.s_noise)
            out = out + self._noise
        return out


class SASolverPECE(SASolver):
    """ComfyUI's ``sa_solver_pece``: SA-Solver in predict-evaluate-correct-evaluate mode."""

    pece = True


#: name -> stepper class, looked up by ``steppers.kiln_stepper_class``.
STEPPERS: dict[str, Any] = {
    "res_multistep_ancestral": ResMultistepAncestral,
    "res_multistep_ancestral_cfg_pp": ResMultistepAncestralCFGPP,
    "dpmpp_2s_ancestral_cfg_pp": DPMpp2SAncestralCFGPP,
    "er_sde": ERSDE,
    "seeds_2": SEEDS,
    "seeds_3": SEEDS3,
    "exp_heun_2_x0_sde": ExpHeun2X0SDE,
    "sa_solver": SASolver,
    "sa_solver_pece": SASolverPECE,
}
