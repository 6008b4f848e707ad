"""ComfyUI's deterministic samplers that Kiln runs as its own steppers (nodes/samplers/multistep.py),
and dpmpp_2m_sde_heun on diffusers' DPM-Solver.

Each stepper lands on the clean latent with a perfect denoiser (test_sampling's
test_samplers_on_a_sigma_list_land_on_the_clean_latent_with_a_perfect_denoiser); on Gaussian data, where
the probability-flow ODE has a closed form, each converges to it at its order and beats
Euler at equal model evaluations (a wrong weight or stage breaks the order); the CFG++
forms equal their plain forms without guidance and their formula with it. Running
through ``ksampler`` on the tiny SD1 is test_sampling's test_every_sampler_and_schedule_runs.
"""
from __future__ import annotations

import math

import pytest
import torch

from nodes.samplers import multistep, schedules, steppers
from nodes.samplers.names import resolve_sampler
from test_samplers_sde import SD15, _run

MU, S = 0.5, 0.8  # every latent element is x0 ~ N(MU, S^2)
SIGMA0, END = 10.0, 0.1


def _stepper(name: str, sigmas: torch.Tensor, prediction: str = "epsilon"):
    """Kiln's own stepper for ``name`` (deis and lms included, which SD runs on diffusers)."""
    assert not resolve_sampler(name).stochastic
    return steppers.kiln_stepper_class(name)({**SD15, "prediction_type": prediction}, sigmas)


def _ideal(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def _noise() -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()


def _error(name: str, steps: int) -> tuple[float, int]:
    """Mean distance to the exact ODE state at END after ``steps`` steps of a Karras grid from
    SIGMA0 (a list ending above 0, so no final jump to the prediction hides the order),
    and the number of model evaluations."""
    sigmas = schedules.karras(steps, END, SIGMA0)[:-1]
    sched = _stepper(name, sigmas)
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    calls = len(sched.timesteps)
    out = _run(sched, x, _ideal, [torch.Generator().manual_seed(1)])
    exact = MU + (x - MU) * math.sqrt((S ** 2 + END ** 2) / (S ** 2 + SIGMA0 ** 2))
    return (out - exact).abs().mean().item(), calls


@pytest.mark.parametrize("name,ratio", [("ipndm_v", 6.0), ("dpmpp_2m_cfg_pp", 3.0), ("res_multistep_cfg_pp", 3.0),
                                        ("exp_heun_2_x0", 3.0)])
def test_each_converges_at_its_order_and_beats_euler(name, ratio):
    """Doubling the steps cuts the error by ``ratio`` (Euler's first order gives about 2,
    checked below), and at equal model evaluations the method is closer than Euler."""
    err8, calls8 = _error(name, 8)
    err16, _ = _error(name, 16)
    assert err8 / err16 > ratio, (err8, err16)
    euler, _ = _error("euler_cfg_pp", calls8)  # without an unguided output: plain Euler
    assert err8 < euler, (err8, euler)


def test_gradient_estimation_beats_euler_by_its_correction_term():
    """Its correction (gamma - 1)(d - d_previous) dt is what it adds to Euler: on this data it
    cuts Euler's error by a quarter or more at equal evaluations, and a step is that formula by hand."""
    for steps in (8, 16):
        err, calls = _error("gradient_estimation", steps)
        assert err < 0.8 * _error("euler_cfg_pp", calls + 1)[0], steps
    sigmas = schedules.karras(4, END, SIGMA0)
    sched = _stepper("gradient_estimation", sigmas)
    s = [float(v) for v in sigmas]
    x0 = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    x1 = sched.step((x0 - _ideal(x0, s[0])) / s[0], sched.timesteps[0], x0).prev_sample
    d0 = (x0 - _ideal(x0, s[0])) / s[0]
    assert torch.allclose(x1, x0 + d0 * (s[1] - s[0]), atol=1e-5)  # the first step is Euler's
    x2 = sched.step((x1 - _ideal(x1, s[1])) / s[1], sched.timesteps[1], x1).prev_sample
    d1 = (x1 - _ideal(x1, s[1])) / s[1]
    assert torch.allclose(x2, x1 + d1 * (s[2] - s[1]) + (2.0 - 1) * (d1 - d0) * (s[2] - s[1]), atol=1e-5)


def test_heunpp2_weights_its_look_ahead_derivatives_by_their_noise_level():
    """Heun++ is first order (its weights fade with the noise level), so it is checked by its
    formula: one full step by hand, three evaluations, and convergence to the exact flow."""
    sigmas = schedules.karras(5, END, SIGMA0)
    sched = _stepper("heunpp2", sigmas)
    s = [float(v) for v in sigmas]
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    d = lambda y, sigma: (y - _ideal(y, sigma)) / sigma  # noqa: E731
    x2 = x + d(x, s[0]) * (s[1] - s[0])
    x3 = x2 + d(x2, s[1]) * (s[2] - s[1])
    w2, w3 = s[1] / (3 * s[0]), s[2] / (3 * s[0])
    expected = x + ((1 - w2 - w3) * d(x, s[0]) + w2 * d(x2, s[1]) + w3 * d(x3, s[2])) * (s[1] - s[0])
    state = x
    for k in range(3):
        sigma = sched.stages[k][2]
        state = sched.step((state - _ideal(state, sigma)) / sigma, sched.timesteps[k], state).prev_sample
    assert torch.allclose(state, expected, atol=1e-5)
    assert _error("heunpp2", 8)[0] / _error("heunpp2", 16)[0] > 1.6


def test_euler_baseline_is_first_order():
    e8, e16 = _error("euler_cfg_pp", 8)[0], _error("euler_cfg_pp", 16)[0]
    assert 1.5 < e8 / e16 < 2.5


def test_adams_bashforth_weights_are_exact_and_classic_on_an_even_grid():
    assert multistep.adams_bashforth_weights([3.0, 2.0, 1.0, 0.0], 4.0) == pytest.approx([55 / 24, -59 / 24, 37 / 24,
                                                                                          -9 / 24])
    points, target = [3.1, 5.5, 9.0, 14.6], 1.7  # a descending, uneven sigma grid
    weights = multistep.adams_bashforth_weights(points, target)
    for power in range(4):  # integrates every cubic exactly: d(x)/d(sigma) = p sigma^(p-1) -> x = sigma^p
        f = [power * p ** (power - 1) if power else 0.0 for p in points]
        step = (target - points[0]) * sum(w * v for w, v in zip(weights, f))
        assert step == pytest.approx(target ** power - points[0] ** power, abs=1e-9)
    assert sum(weights) == pytest.approx(1.0)


def test_heunpp2_evaluates_three_times_a_step_then_heun_then_euler():
    sigmas = schedules.karras(5, 0.1, 10.0)  # 5 steps ending in 0
    sched = _stepper("heunpp2", sigmas)
    per_step = [sum(1 for i, _, _ in sched.stages if i == step) for step in range(5)]
    assert per_step == [3, 3, 3, 2, 1]


@pytest.mark.parametrize("name,plain", [("gradient_estimation_cfg_pp", "gradient_estimation"),
                                        ("res_multistep_cfg_pp", "res_multistep")])
def test_cfg_pp_forms_equal_their_plain_forms_without_guidance(name, plain):
    sigmas = schedules.karras(6, 0.1, 10.0)
    x = MU + math.sqrt(S ** 2 + 100) * _noise()
    ours = _run(_stepper(name, sigmas), x, _ideal, [None])
    assert torch.allclose(ours, _run(steppers.on_sigmas(resolve_sampler(plain), SD15, sigmas), x, _ideal, [None]),
                          atol=1e-5)


def test_dpmpp_2m_cfg_pp_is_dpm_solver_2m_without_guidance_and_follows_the_unguided_direction_with_it():
    sigmas = schedules.karras(6, 0.1, 10.0)
    s = [float(v) for v in sigmas]
    x0 = MU + math.sqrt(S ** 2 + 100) * _noise()
    sched = _stepper("dpmpp_2m_cfg_pp", sigmas)
    x1 = sched.step((x0 - _ideal(x0, s[0])) / s[0], sched.timesteps[0], x0).prev_sample
    x2 = sched.step((x1 - _ideal(x1, s[1])) / s[1], sched.timesteps[1], x1).prev_sample
    # DPM-Solver++(2M) (Lu et al. 2022) in the variance-exploding form, written from the paper
    h0, h1 = math.log(s[0] / s[1]), math.log(s[1] / s[2])
    first = s[1] / s[0] * x0 - math.expm1(-h0) * _ideal(x0, s[0])
    r = h0 / h1
    mixed = (1 + 1 / (2 * r)) * _ideal(first, s[1]) - 1 / (2 * r) * _ideal(x0, s[0])
    assert torch.allclose(x1, first, atol=1e-5)
    assert torch.allclose(x2, s[2] / s[1] * first - math.expm1(-h1) * mixed, atol=1e-5)
    # with guidance, the first step by hand: x' = D + (sigma'/sigma) (x - U), D guided, U unguided
    sched = _stepper("dpmpp_2m_cfg_pp", sigmas)
    guided, unguided = _ideal(x0, s[0]), _ideal(x0, s[0]) * 0.5
    out = sched.step((x0 - guided) / s[0], sched.timesteps[0], x0, uncond=(x0 - unguided) / s[0]).prev_sample
    assert torch.allclose(out, guided + s[1] / s[0] * (x0 - unguided), atol=1e-5)


def test_dpmpp_2m_sde_heun_is_its_own_method_and_gpu_is_the_same():
    sde_heun, gpu = resolve_sampler("dpmpp_2m_sde_heun"), resolve_sampler("dpmpp_2m_sde_heun_gpu")
    assert sde_heun.config["solver_type"] == "heun" and gpu.config == sde_heun.config
    assert resolve_sampler("dpmpp_2m_sde").config["solver_type"] == "midpoint"


def _run_diffusers(sched, x: torch.Tensor) -> torch.Tensor:
    """A diffusers k-scheduler (state x0 + sigma eps) over the ideal denoiser; second-order
    stages (KDPM2) evaluate at its interpolated sigma."""
    for t in sched.timesteps:
        sched.scale_model_input(x, t)  # sets the step index
        index = sched.step_index
        first = getattr(sched, "state_in_first_order", True)
        sigma = float(sched.sigmas[index] if first else sched.sigmas_interpol[index])
        x = sched.step((x - _ideal(x, sigma)) / sigma, t, x).prev_sample
    return x


def _kiln_and_diffusers(name: str, steps: int, cls: type) -> tuple:
    """(Kiln's stepper's result, diffusers' class's result, the start, the sigmas) for ``name`` on
    one Karras list from the same start; diffusers' scheduler is checked to be ``cls``."""
    sigmas = schedules.karras(steps, 0.03, SIGMA0)
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    ours = _run(_stepper(name, sigmas), x, _ideal, [None])
    theirs = steppers.on_sigmas(resolve_sampler(name), SD15, sigmas)
    assert isinstance(theirs, cls)
    return ours, _run_diffusers(theirs, x), x, sigmas


def test_the_lms_stepper_is_diffusers_lms():
    """Kiln's LMS (variable-step Adams-Bashforth of order 4 on the derivative, integrating to 0)
    and diffusers' LMSDiscreteScheduler (k-diffusion's LMS, scipy's quadrature) take the same
    steps on the same Karras list: the one flow models run is the one SD runs."""
    from diffusers import LMSDiscreteScheduler

    ours, y, x, sigmas = _kiln_and_diffusers("lms", 9, LMSDiscreteScheduler)
    assert torch.allclose(ours, y, atol=1e-4), (ours - y).abs().max()
    assert (ours - _run(_stepper("ipndm_v", sigmas), x, _ideal, [None])).abs().max() > 1e-4  # not landing early


@pytest.mark.parametrize("name", ["deis", "lms"])
def test_deis_and_lms_steppers_converge_at_high_order(name):
    err8, calls = _error(name, 8)
    err16, _ = _error(name, 16)
    assert err8 / err16 > 5.0 and err8 < 0.5 * _error("euler_cfg_pp", calls + 1)[0], (err8, err16)


def test_the_dpm_2_stepper_is_diffusers_kdpm2():
    """DPM-Solver-2 (midpoint in log sigma, the last step Euler's): Kiln's stepper, which flow
    models run, and diffusers' KDPM2DiscreteScheduler, which SD runs, take the same steps."""
    from diffusers import KDPM2DiscreteScheduler

    ours, y, _, _ = _kiln_and_diffusers("dpm_2", 7, KDPM2DiscreteScheduler)
    assert torch.allclose(ours, y, atol=1e-4), (ours - y).abs().max()
    err8, err16 = _error("dpm_2", 8)[0], _error("dpm_2", 16)[0]
    assert err8 / err16 > 3.0, (err8, err16)

