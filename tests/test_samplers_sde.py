"""ComfyUI's stochastic samplers that Kiln runs as its own steppers (nodes/samplers/stochastic.py).

Each sampler is checked three ways: with a perfect denoiser it lands on the clean
latent (epsilon and v-prediction); on Gaussian data, where the ideal denoiser is known
in closed form, its samples have the data's mean and standard deviation, and the same
run with the fresh noise doubled or left out does not (so the check can tell a wrong
noise scale); the same seed gives the same bytes and another seed differs. Running
through ``ksampler`` on the tiny SD1 is test_sampling's
test_every_sampler_and_schedule_runs, which covers every name in SAMPLERS.
"""
from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from nodes.samplers import kdiffusion, schedules, steppers, stochastic
from nodes.samplers.names import resolve_sampler

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")
#: Gaussian data: every latent element is x0 ~ N(MU, S^2).
MU, S = 0.5, 0.8

NAMES = ["res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "er_sde", "seeds_2",
         "seeds_3", "sa_solver", "sa_solver_pece", "exp_heun_2_x0_sde"]


def _stepper(name: str, sigmas: torch.Tensor, prediction: str = "epsilon"):
    spec = resolve_sampler(name)
    assert spec.stochastic and spec.kiln_stepper == name and name in stochastic.STEPPERS
    return steppers.on_sigmas(spec, {**SD15, "prediction_type": prediction}, sigmas)


def _sigma_now(sched) -> float:
    """The sigma of the evaluation ``sched`` is about to take."""
    if hasattr(sched, "current_sigma"):  # dpm_adaptive chooses its levels as it goes
        return float(sched.current_sigma)
    stages = getattr(sched, "stages", None)
    return float(stages[sched._index][2]) if stages is not None else float(sched.sigmas[sched._index])


def _output(denoised: torch.Tensor, x: torch.Tensor, sigma: float, prediction: str) -> torch.Tensor:
    """The network output whose clean-latent prediction at (x, sigma) is ``denoised``."""
    eps = (x - denoised) / sigma
    if prediction == "epsilon":
        return eps
    alpha = (1 + sigma ** 2) ** -0.5
    return alpha * eps - sigma * alpha * denoised  # v = alpha * eps - sigma_vp * x0, sigma_vp = sigma * alpha


def _run(sched, x: torch.Tensor, denoiser, generators: list, prediction: str = "epsilon",
         unguided: Any = "same") -> torch.Tensor:
    """The sampling loop with an analytic denoiser(x, sigma) -> clean prediction. CFG++
    steppers get ``unguided``(x, sigma) as the unguided prediction; by default the guided
    one (no guidance), with None no ``uncond`` at all."""
    params = inspect.signature(sched.step).parameters
    for t in sched.timesteps:
        sigma = _sigma_now(sched)
        out = _output(denoiser(x, sigma), x, sigma, prediction)
        kwargs = {}
        if "uncond" in params and unguided is not None:
            kwargs["uncond"] = out if unguided == "same" else _output(unguided(x, sigma), x, sigma, prediction)
        x = sched.step(out, t, x, generator=generators, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_lands_on_the_clean_latent_with_a_perfect_denoiser(name, prediction):
    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", 8)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    x = x0 + float(sigmas[0]) * torch.randn(1, 4, 8, 8, generator=gen)
    sched = _stepper(name, sigmas, prediction)
    out = _run(sched, x, lambda x, sigma: x0, [gen], prediction)
    assert torch.allclose(out, x0, atol=1e-4), (out - x0).abs().max()


def _scale_noise(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """Every stepper module's fresh noise multiplied by ``scale`` (a deliberately wrong sampler)."""
    def scaled(x, generator):
        return scale * torch.randn(x.shape, generator=generator[0])
    for module in (kdiffusion, steppers, stochastic):
        monkeypatch.setattr(module, "randn_like", scaled)


#: ComfyUI's dpmpp_2s_ancestral_cfg_pp is not the plain sampler even without guidance (its second
#: stage pairs the first stage's guided prediction with the midpoint's unguided one: at 64 steps
#: the Gaussian samples' std is 0.66, not 0.80), so its Gaussian check runs without ``uncond``
#: (the plain path, which tests its noise) and test_cfgpp_steps_match_comfyui_formulas tests the shift.
NO_UNCOND = {"dpmpp_2s_ancestral_cfg_pp"}


def _gaussian_samples(name: str, seed: int, steps: int = 64, noise_scale: float = 1.0,
                      monkeypatch: pytest.MonkeyPatch | None = None) -> torch.Tensor:
    """Samples of N(MU, S^2) data from the ideal denoiser, started at sigma_max. Ancestral
    samplers lose or gain variance on coarse grids (euler_ancestral: std 0.66 at 16 karras
    steps, 0.77 at 64), hence the fine grid."""
    if noise_scale != 1.0:
        _scale_noise(monkeypatch, noise_scale)
    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", steps)
    gen = torch.Generator().manual_seed(seed)
    s0 = float(sigmas[0])
    x = MU + (S ** 2 + s0 ** 2) ** 0.5 * torch.randn(1, 4, 64, 64, generator=gen)

    def ideal(x, sigma):
        return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)

    return _run(_stepper(name, sigmas), x, ideal, [gen], unguided=None if name in NO_UNCOND else "same")


#: How close the samples' mean and std must come to MU and S: the sampling error of
#: 16384 values is about 0.006; doubling or dropping the noise moves the std by > 0.1.
TOL = 0.04


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_data_samples_have_the_data_mean_and_std(name):
    """The final samples' mean and std match the data's. Checked to fail, by the test below,
    when the fresh noise is doubled or left out."""
    x = _gaussian_samples(name, seed=1)
    assert abs(float(x.mean()) - MU) < TOL and abs(float(x.std()) - S) < TOL, (float(x.mean()), float(x.std()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("noise_scale", [0.0, 2.0])
def test_a_wrong_noise_scale_breaks_the_gaussian_check(name, noise_scale, monkeypatch):
    x = _gaussian_samples(name, seed=1, noise_scale=noise_scale, monkeypatch=monkeypatch)
    assert abs(float(x.std()) - S) > 2 * TOL, float(x.std())


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_another_seed_differs(name):
    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", 6)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        x = MU + (S ** 2 + float(sigmas[0]) ** 2) ** 0.5 * torch.randn(1, 4, 8, 8, generator=gen)
        return _run(_stepper(name, sigmas), x, lambda x, sigma: MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU),
                    [torch.Generator().manual_seed(seed)])

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4), atol=1e-3)


def _guided(x, sigma):
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def _unguided(x, sigma):
    return 0.3 + 0.5 / (1 + sigma ** 2) * (x - 0.3)


def _first_steps(sched, x: torch.Tensor, evaluations: int) -> torch.Tensor:
    for t in sched.timesteps[:evaluations]:
        sigma = _sigma_now(sched)
        out, unc = _output(_guided(x, sigma), x, sigma, "epsilon"), _output(_unguided(x, sigma), x, sigma, "epsilon")
        x = sched.step(out, t, x, generator=[torch.Generator().manual_seed(0)], uncond=unc).prev_sample
    return x


def test_cfgpp_steps_match_comfyui_formulas(monkeypatch):
    """With guided and unguided predictions that differ (and the fresh noise off), the CFG++
    steppers' first steps equal ComfyUI's formulas written out here: res_multistep's Euler
    first step and its multistep second, DPM++(2S)'s two stages."""
    import math

    _scale_noise(monkeypatch, 0.0)
    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", 6)
    s0, s1, s2 = (float(v) for v in sigmas[:3])
    x = MU + 2.0 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    down0, _ = kdiffusion.ancestral_step(s0, s1)
    down1, _ = kdiffusion.ancestral_step(s1, s2)

    # res_multistep_ancestral_cfg_pp: x1 = Dc + (x - Du) / s0 * down0, then the RES step from x1 at s1.
    x1 = _guided(x, s0) + (x - _unguided(x, s0)) / s0 * down0
    assert torch.allclose(_first_steps(_stepper("res_multistep_ancestral_cfg_pp", sigmas), x, 1), x1, atol=1e-5)
    h = math.log(s1 / down1)
    c2 = (-math.log(s0) + math.log(down0)) / h  # (t_prev - t_old) / h: the previous step, from s0 to its down
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1) / -h
    du1 = _unguided(x1, s1)
    x2 = math.exp(-h) * (x1 + _guided(x1, s1) - du1) + h * ((phi1 - phi2 / c2) * du1 + phi2 / c2 * _unguided(x, s0))
    assert torch.allclose(_first_steps(_stepper("res_multistep_ancestral_cfg_pp", sigmas), x, 2), x2, atol=1e-5)

    # dpmpp_2s_ancestral_cfg_pp: the midpoint from x + (Dc - Du), then the step, shifted by the
    # first guided minus the midpoint's unguided prediction (as ComfyUI's code does).
    h = math.log(s0 / down0)
    mid = math.sqrt(s0 * down0)
    x_mid = mid / s0 * (x + _guided(x, s0) - _unguided(x, s0)) - math.expm1(-h / 2) * _guided(x, s0)
    x1 = down0 / s0 * (x + _guided(x, s0) - _unguided(x_mid, mid)) - math.expm1(-h) * _guided(x_mid, mid)
    sched = _stepper("dpmpp_2s_ancestral_cfg_pp", sigmas)
    assert torch.allclose(_first_steps(sched, x, 1), x_mid, atol=1e-5)
    assert torch.allclose(_first_steps(_stepper("dpmpp_2s_ancestral_cfg_pp", sigmas), x, 2), x1, atol=1e-5)


def test_er_sde_higher_stages_are_what_make_a_coarse_grid_accurate(monkeypatch):
    """At 16 steps ER-SDE-3's samples have the data's std within 0.01; with its stage-2 and
    stage-3 terms cut off (max_stage 1) they are 0.08 short, so those terms are right."""
    x = _gaussian_samples("er_sde", seed=1, steps=16)
    assert abs(float(x.std()) - S) < 0.015, float(x.std())
    monkeypatch.setattr(stochastic.ERSDE, "max_stage", 1)
    x = _gaussian_samples("er_sde", seed=1, steps=16)
    assert abs(float(x.std()) - S) > 0.05, float(x.std())


@pytest.mark.parametrize("name,per_step", [("seeds_2", 2), ("seeds_3", 3), ("exp_heun_2_x0_sde", 2)])
def test_staged_samplers_evaluate_at_their_stage_sigmas(name, per_step):
    """SEEDS evaluates per_step times a step (once on the last step, to 0), at the sigmas
    spaced evenly in log sigma between the step's ends (exp_heun_2_x0_sde: at the step's
    start and end); the timesteps the model gets are those sigmas' timesteps."""
    import math

    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", 6)
    sched = _stepper(name, sigmas)
    assert len(sched.timesteps) == per_step * 5 + 1
    first = [s for i, _, s in sched.stages if i == 0]
    s0, s1 = float(sigmas[0]), float(sigmas[1])
    fractions = [k / per_step for k in range(per_step)] if name.startswith("seeds") else [0.0, 1.0]
    assert first == pytest.approx([s0 * (s1 / s0) ** r for r in fractions])
    assert torch.allclose(ts.sigma(sched.timesteps), torch.tensor([s for _, _, s in sched.stages]), rtol=1e-3)
    assert math.isclose(sched.stages[-1][2], float(sigmas[-2]))


def test_sa_solver_stochastic_only_between_comfyuis_percent_sigmas():
    """tau = 1 between the model's sigmas at 20% and 80% of the schedule (ComfyUI's
    percent_to_sigma(0.8) and (0.2)), 0 outside; pece evaluates twice at every sigma but the first."""
    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", 10)
    sched = _stepper("sa_solver", sigmas)
    low, high = float(ts.sigma(0.2 * 999)), float(ts.sigma(0.8 * 999))
    assert sched.tau_range == pytest.approx((low, high)) and 0.5 < low < 0.7 and 4.5 < high < 5.5
    assert [sched.tau(s) for s in (high * 1.01, high * 0.99, low * 1.01, low * 0.99)] == [0.0, 1.0, 1.0, 0.0]
    assert len(sched.timesteps) == 10
    pece = _stepper("sa_solver_pece", sigmas)
    twice = [float(s) for s in sigmas[1:-1] for _ in (0, 1)]
    assert [s for _, _, s in pece.stages] == pytest.approx([float(sigmas[0])] + twice)


@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_adams_weights_are_high_order(name, monkeypatch):
    """With tau forced to 0 (the ODE) on Gaussian data the exact endpoint is known: the
    default orders (predictor 3, corrector 4) land within 0.01 of it at 16 steps; first-order
    predictor and corrector miss by over 0.1, so the higher-order weights are right."""
    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", 16)
    s0 = float(sigmas[0])
    gen = torch.Generator().manual_seed(2)
    x = MU + (S ** 2 + s0 ** 2) ** 0.5 * torch.randn(1, 4, 16, 16, generator=gen)
    exact = MU + (x - MU) * (S ** 2 / (S ** 2 + s0 ** 2)) ** 0.5
    errors = []
    for orders in ((3, 4), (1, 1)):
        sched = _stepper(name, sigmas)
        monkeypatch.setattr(sched, "tau", lambda sigma: 0.0)
        sched.predictor_order, sched.corrector_order = orders
        errors.append(float((_run(sched, x, _guided, [gen]) - exact).abs().max()))
    assert errors[0] < 0.01 and errors[1] > 0.1, errors


@pytest.mark.parametrize("name,order", [("seeds_2", 2), ("seeds_3", 3), ("exp_heun_2_x0_sde", 2)])
def test_seeds_stage_weights_have_the_methods_order(name, order):
    """With eta = 0 SEEDS is a deterministic exponential Runge-Kutta method: on Gaussian data
    (float64) its error against the exact ODE solution at the list's last sigma falls by about
    2^order from 16 to 32 exponential steps (measured 4.1, 6.8, 4.1); a wrong stage weight
    would leave it first order (ratio 2)."""
    ts = schedules.TrainingSchedule(SD15)
    errors = []
    for steps in (16, 32):
        sigmas = schedules.comfy_sigmas(ts, "exponential", steps)[:-1]  # stop above 0: no final Euler step
        sched = stochastic.STEPPERS[name](SD15, sigmas)
        sched.eta = 0.0
        s0, end = float(sigmas[0]), float(sigmas[-1])
        gen = torch.Generator().manual_seed(2)
        x = MU + (S ** 2 + s0 ** 2) ** 0.5 * torch.randn(1, 4, 16, 16, generator=gen, dtype=torch.float64)
        exact = MU + (x - MU) * ((S ** 2 + end ** 2) / (S ** 2 + s0 ** 2)) ** 0.5
        errors.append(float((_run(sched, x, _guided, [gen]) - exact).abs().max()))
    assert errors[0] / errors[1] > 2 ** order * 0.8, errors


@pytest.fixture(scope="module")
def sd1():
    from test_sampling import Tiny

    return Tiny("sd1")


@pytest.mark.parametrize("sampler", ["res_multistep_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "er_sde",
                                     "seeds_3", "sa_solver_pece", "exp_heun_2_x0_sde"])
def test_batch_item_equals_single_run_with_seed_plus_i(sd1, sampler):
    """Through ksampler on the tiny SD1, guided (cfg 2, CFG++'s range), so CFG++ steppers get
    the unguided output from the loop: each image's fresh noise comes from its own
    generator, so batch item i is the single run with seed + i, and the items differ."""
    def run(seed, latent):
        return sd1.img2img(sampler, seed=seed, steps=6, latent=latent, strength=0.8, cfg=2.0)["samples"]

    batch = torch.cat([sd1.init, sd1.init * 0.5])
    out = run(100, batch)
    for i in range(2):
        assert torch.allclose(out[i:i + 1], run(100 + i, batch[i:i + 1]), rtol=1e-4, atol=1e-4), i
    assert not torch.allclose(out[:1], run(101, batch[:1]), atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_a_list_ending_above_zero_stops_at_its_last_sigma(name):
    """KSamplerAdvanced's leftover noise (steppers.follow): on the first half of the 64-step
    grid the Gaussian samples must have the spread of data noised to the list's last sigma,
    sqrt(S^2 + sigma_end^2), within 2.5% (measured: 1.3% at most). The state one sigma earlier,
    what ComfyUI's SA-Solver returns there, would be 6.9% too wide."""
    from nodes.samplers.steppers import follow

    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_sigmas(ts, "karras", 64)[:33]
    end = float(sigmas[-1])
    sched, timesteps = follow(resolve_sampler(name), SD15, sigmas)
    assert len(timesteps) == len(sched.timesteps)
    gen = torch.Generator().manual_seed(1)
    x = MU + (S ** 2 + float(sigmas[0]) ** 2) ** 0.5 * torch.randn(1, 4, 64, 64, generator=gen)
    x = _run(sched, x, _guided, [gen], unguided=None if name in NO_UNCOND else "same")
    spread = (S ** 2 + end ** 2) ** 0.5
    assert abs(float(x.mean()) - MU) < TOL and abs(float(x.std()) / spread - 1) < 0.025, (float(x.std()), spread)


@pytest.mark.parametrize("name", NAMES)
def test_split_sigmas_through_sampler_custom_advanced(sd1, name):
    """KSamplerSelect -> SamplerCustomAdvanced on the high half of a split karras list, then
    the low half from its leftover noise: both run (every model evaluation reported) and
    the result is finite."""
    from test_sampling import Recorder

    from nodes import custom_sampling as cs

    ctx = Recorder().ctx
    guider, = cs.cfg_guider(ctx, sd1.model, sd1.pos, sd1.neg, 2.0)
    sigmas, = cs.basic_scheduler(ctx, sd1.model, "karras", 8, 1.0)
    high, low = cs.split_sigmas(ctx, sigmas, 3)
    spec, = cs.ksampler_select(ctx, name)
    rec = Recorder()
    first, _ = cs.sampler_custom_advanced(rec.ctx, cs.random_noise(ctx, 2)[0], guider, spec, high,
                                          {"samples": torch.zeros_like(sd1.init)})
    assert rec.steps and rec.steps[-1][0] == rec.steps[-1][1]
    second, _ = cs.sampler_custom_advanced(ctx, cs.disable_noise(ctx)[0], guider, spec, low, first)
    assert torch.isfinite(second["samples"]).all() and not torch.equal(second["samples"], first["samples"])


def test_a_repeated_level_is_a_step_of_length_zero_for_every_kiln_stepper():
    """A hand-made SIGMAS list may repeat a level. Every Kiln stepper that steps over the list's
    intervals takes it exactly as the list without the repeat (the exponential and multistep
    formulas divided by the step's length: NaN or ZeroDivisionError before); dpm_fast, which
    spends one evaluation per interval on a grid of its own, stays finite."""
    from nodes.samplers.names import SAMPLERS

    base = schedules.karras(8, 0.05, 10.0)
    repeated = torch.cat([base[:3], base[2:3], base[3:]])
    x = MU + (S ** 2 + 100.0) ** 0.5 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def ideal(x, sigma):
        return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)

    names = sorted({spec.kiln_stepper for spec in SAMPLERS if spec.kiln_stepper})
    assert len(names) > 30
    for name in names:
        outs = [_run(steppers.kiln_stepper_class(name)(SD15, sigmas), x, ideal, [torch.Generator().manual_seed(1)],
                     unguided=None) for sigmas in (base, repeated)]
        assert torch.isfinite(outs[1]).all(), name
        if name != "dpm_fast":
            assert torch.equal(outs[0], outs[1]), name
