"""ComfyUI's Sampler* nodes: samplers with their settings (eta, s_noise, orders, ...) changed.

The claims: at the defaults each node's SAMPLER is KSamplerSelect's (so it runs exactly
what KSampler runs); Kiln's steppers for the SDE samplers equal diffusers' schedulers step
for step at diffusers' settings (eta 1, s_noise 1), with the same noise; eta 0 gives the
deterministic method of the same order; the noise's scale is what s_noise says (the
Gaussian-data check fails when it is wrong); and changed settings run through
SamplerCustomAdvanced on the tiny SD1 and the tiny FLUX.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes import custom_sampling as cs
from nodes import sampler_settings as ss
from nodes.samplers import schedules, sde, steppers
from nodes.samplers.names import SamplerSpec, resolve_sampler
from test_samplers_ode import _noise
from test_samplers_sde import MU, S, SD15, TOL, _run
from test_sampling import PIXEL_TOL, Recorder, sd1  # noqa: F401 (sd1 is a fixture)

CTX = Recorder().ctx
SIGMA0 = 10.0


def _ideal(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def _tuned(name: str, sigmas: torch.Tensor, config=SD15, **settings):
    spec = steppers.with_settings(resolve_sampler(name), **settings)
    return steppers.follow(spec, config, sigmas)[0]


# -- the nodes -------------------------------------------------------------------------------

@pytest.mark.parametrize("node,args,name", [
    (ss.sampler_euler_ancestral, (1.0, 1.0), "euler_ancestral"),
    (ss.sampler_euler_ancestral_cfg_pp, (1.0, 1.0), "euler_ancestral_cfg_pp"),
    (ss.sampler_dpmpp_2s_ancestral, (1.0, 1.0), "dpmpp_2s_ancestral"),
    (ss.sampler_dpmpp_sde, (1.0, 1.0, 0.5, "cpu"), "dpmpp_sde"),
    (ss.sampler_dpmpp_2m_sde, ("midpoint", 1.0, 1.0, "gpu"), "dpmpp_2m_sde_gpu"),
    (ss.sampler_dpmpp_2m_sde, ("heun", 1.0, 1.0, "cpu"), "dpmpp_2m_sde_heun"),
    (ss.sampler_dpmpp_3m_sde, (1.0, 1.0, "cpu"), "dpmpp_3m_sde"),
    (ss.sampler_lms, (4,), "lms"),
    (ss.sampler_dpm_adaptive, (3, 0.05, 0.0078, 0.05, 0.0, 1.0, 0.0, 0.81, 0.0, 1.0), "dpm_adaptive"),
    (ss.sampler_er_sde, ("ER-SDE", 3, 1.0, 1.0), "er_sde"),
])
def test_at_the_defaults_a_node_gives_ksampler_select_s_sampler(node, args, name):
    (spec,) = node(CTX, *args)
    assert spec == resolve_sampler(name) and spec.options == ()


def test_changed_settings_are_kept_and_only_those():
    (spec,) = ss.sampler_dpmpp_2m_sde(CTX, "heun", 0.5, 1.0, "cpu")
    assert spec.name == "dpmpp_2m_sde_heun" and spec.options == (("eta", 0.5),)
    (spec,) = ss.sampler_sa_solver(CTX, _sd1_handle(), 1.0, 0.2, 0.8, 1.0, 2, 2, True, True)
    assert spec.name == "sa_solver_pece"
    assert dict(spec.options) == {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True}
    (spec,) = ss.sampler_er_sde(CTX, "Reverse-time SDE", 3, 0.0, 1.0)  # ComfyUI: no stochasticity is the ODE
    assert dict(spec.options) == {"solver_type": "ODE"}
    assert steppers.runs_kiln_stepper(spec)
    assert not steppers.runs_kiln_stepper(resolve_sampler("dpmpp_2m_sde"))  # diffusers' class at the defaults


def _sd1_handle():
    from nodes.families import sd1
    from nodes.handles import ModelHandle

    return ModelHandle(sd1.FAMILY, scheduler_config=dict(SD15), latent=sd1.FAMILY.latent)


def test_bad_settings_name_the_input():
    with pytest.raises(NodeError) as err:
        ss.sampler_sa_solver(CTX, "not a model", 1.0, 0.2, 0.8, 1.0, 3, 4, False, False)
    assert err.value.input_name == "model"
    with pytest.raises(NodeError) as err:
        ss.sampler_dpmpp_2m_sde(CTX, "rk4", 1.0, 1.0, "cpu")
    assert err.value.input_name == "solver_type"
    with pytest.raises(NodeError) as err:
        ss.sampler_dpmpp_3m_sde(CTX, 1.0, 1.0, "tpu")
    assert err.value.input_name == "noise_device"
    with pytest.raises(NodeError) as err:
        ss.sampler_dpm_adaptive(CTX, 4, 0.05, 0.0078, 0.05, 0.0, 1.0, 0.0, 0.81, 0.0, 1.0)
    assert err.value.input_name == "order"
    with pytest.raises(NodeError) as err:
        ss.sampler_dpmpp_sde(CTX, 1.0, 1.0, 0.0, "cpu")
    assert err.value.input_name == "r"
    with pytest.raises(TypeError):  # a setting the stepper does not have is a programming error
        steppers.with_settings(resolve_sampler("lms"), eta=0.5)


# -- the SDE steppers against diffusers -----------------------------------------------------

def _diffusers(spec, sigmas: torch.Tensor, x: torch.Tensor, seed: int | None = None,
               steps: int | None = None) -> torch.Tensor:
    """diffusers' DPM-Solver scheduler for ``spec`` on ``sigmas`` (steppers.on_sigmas, the hook KSampler
    uses) over the ideal denoiser from ``x``, for ``steps`` steps (all by default), in Kiln's state
    x0 + sigma * eps (diffusers' is variance-preserving, x / sqrt(1 + sigma^2))."""
    sched = steppers.on_sigmas(spec, SD15, sigmas)
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    extra = {} if seed is None else {"generator": [torch.Generator().manual_seed(seed)]}
    steps = len(sched.timesteps) if steps is None else steps
    state = steppers.to_state(sched, x, float(sigmas[0]))
    for i, t in enumerate(sched.timesteps[:steps]):
        sigma = float(sigmas[i])
        ve = state * math.sqrt(1 + sigma ** 2)
        state = sched.step((ve - _ideal(ve, sigma)) / sigma, t, state, **extra).prev_sample
    return steppers.from_state(sched, state, float(sigmas[steps]))


def _diffusers_sde(name: str, sigmas: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    """diffusers' DPM-Solver++ SDE, what KSampler runs for ``name``."""
    return _diffusers(resolve_sampler(name), sigmas, x, seed)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_heun"])
def test_kiln_sde_steppers_equal_diffusers_at_its_settings(name):
    """At eta 1 and s_noise 1 Kiln's stepper (which runs changed settings) takes diffusers'
    steps with the same noise; 16 steps, so diffusers' lower-order ending (under 15) is off."""
    sigmas = schedules.karras(16, 0.03, SIGMA0)
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    kiln = steppers.kiln_stepper_class(resolve_sampler(name).kiln_stepper)(SD15, sigmas)
    ours = _run(kiln, x, _ideal, [torch.Generator().manual_seed(3)])
    theirs = _diffusers_sde(name, sigmas, x, 3)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # Not vacuous: another eta is another result, and another seed too.
    assert (_run(_tuned(name, sigmas, eta=0.5), x, _ideal, [torch.Generator().manual_seed(3)]) - theirs).abs().max() > 1e-2
    assert (_diffusers_sde(name, sigmas, x, 4) - theirs).abs().max() > 1e-2


#: diffusers' DPM-Solver++(3M) SDE, which no sampler name runs any more (see the test below).
DIFFUSERS_3M_SDE = SamplerSpec("diffusers_3m_sde", "diffusers_3m_sde", "DPMSolverMultistepScheduler",
                               config={"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                       "final_sigmas_type": "zero"})


def _diffusers_3m_sde(sigmas: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    return _diffusers(DIFFUSERS_3M_SDE, sigmas, x, seed=3, steps=steps)


def test_3m_sde_differs_from_diffusers_by_its_third_order_term_alone():
    """diffusers' DPM-Solver++(3M) SDE weights the second divided difference D2 by
    (1 - e^(-2h) - 2h) / (2h)^2 - 1/2; the SDE's integral (and ComfyUI) give + 1/2. So the
    first two steps (first and second order) are equal, and after the third the two states
    differ by exactly D2 (alpha = 1 on SD), with the same noise. Kiln's (the right one)
    keeps the data's spread where diffusers' overshoots it."""
    sigmas = schedules.karras(16, 0.03, SIGMA0)
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    kiln = sde.DPMpp3MSDE(SD15, sigmas)
    gen = [torch.Generator().manual_seed(3)]
    y, preds = x, []
    for i in range(3):
        sigma = float(sigmas[i])
        preds.append(_ideal(y, sigma))
        y = kiln.step((y - preds[-1]) / sigma, kiln.timesteps[i], y, generator=gen).prev_sample
        if i == 1:
            assert torch.allclose(y, _diffusers_3m_sde(sigmas, x, 2), atol=5e-3)  # float32 at |x| ~ 10
    lam = [-math.log(float(v)) for v in sigmas[:4]]
    h, h1, h2 = lam[3] - lam[2], lam[2] - lam[1], lam[1] - lam[0]
    r0, r1 = h1 / h, h2 / h
    d1_0, d1_1 = (preds[2] - preds[1]) / r0, (preds[1] - preds[0]) / r1
    d2 = (d1_0 - d1_1) / (r0 + r1)
    theirs = _diffusers_3m_sde(sigmas, x, 3)
    assert torch.allclose(y - theirs, d2, atol=5e-3), (y - theirs - d2).abs().max()
    assert d2.abs().max() > 0.1  # not vacuous: the term is there


def test_2m_sde_at_eta_zero_is_diffusers_dpmpp_2m():
    sigmas = schedules.karras(16, 0.03, SIGMA0)
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    ours = _run(_tuned("dpmpp_2m_sde", sigmas, eta=0.0), x, _ideal, [torch.Generator().manual_seed(1)])
    again = _run(_tuned("dpmpp_2m_sde", sigmas, eta=0.0), x, _ideal, [torch.Generator().manual_seed(2)])
    assert torch.equal(ours, again)  # no noise drawn
    state = _diffusers(resolve_sampler("dpmpp_2m"), sigmas, x)
    assert torch.allclose(ours, state, atol=1e-4), (ours - state).abs().max()


def _ode_error(stepper_of, steps: int, end: float = 0.1) -> float:
    """Distance to the exact probability-flow state at ``end`` after ``steps`` Karras steps."""
    sigmas = schedules.karras(steps, end, SIGMA0)[:-1]
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    out = _run(stepper_of(sigmas), x, _ideal, [torch.Generator().manual_seed(1)])
    exact = MU + (x - MU) * math.sqrt((S ** 2 + end ** 2) / (S ** 2 + SIGMA0 ** 2))
    return (out - exact).abs().mean().item()


@pytest.mark.parametrize("name,settings,ratio", [
    ("dpmpp_3m_sde", {"eta": 0.0}, 5.0),       # DPM-Solver++(3M)
    ("dpmpp_sde", {"eta": 0.0}, 3.0),          # DPM-Solver++(2S) with r = 1/2
    ("lms", {"max_order": 2}, 3.0),            # second-order Adams-Bashforth
    ("er_sde", {"solver_type": "ODE"}, 3.0),   # ER-SDE-Solver-3's ODE
])
def test_deterministic_settings_converge_at_their_order(name, settings, ratio):
    err8 = _ode_error(lambda s: _tuned(name, s, **settings), 8)
    err16 = _ode_error(lambda s: _tuned(name, s, **settings), 16)
    assert err8 / err16 > ratio, (err8, err16)


def test_lms_order_one_is_euler():
    euler = _ode_error(lambda s: steppers.kiln_stepper_class("euler_cfg_pp")(SD15, s), 8)
    first = _ode_error(lambda s: _tuned("lms", s, max_order=1), 8)
    assert first == pytest.approx(euler, rel=1e-4)
    assert _ode_error(lambda s: _tuned("lms", s, max_order=2), 8) < 0.6 * euler


# -- the noise's scale: Gaussian data ---------------------------------------------------------

def _gaussian(name: str, seed: int = 1, steps: int = 64, **settings) -> torch.Tensor:
    sigmas = schedules.comfy_sigmas(schedules.TrainingSchedule(SD15), "karras", steps)
    gen = torch.Generator().manual_seed(seed)
    x = MU + (S ** 2 + float(sigmas[0]) ** 2) ** 0.5 * torch.randn(1, 4, 64, 64, generator=gen)
    return _run(_tuned(name, sigmas, **settings), x, _ideal, [gen], unguided=None)


@pytest.mark.parametrize("name,settings", [
    ("dpmpp_sde", {"eta": 0.5, "r": 0.4}),  # at eta 1 ancestral steps lose spread on coarse grids (0.76 at 64)
    ("dpmpp_2m_sde", {"eta": 0.5}),
    ("euler_ancestral", {"eta": 0.5}),
    ("er_sde", {"solver_type": "Reverse-time SDE", "eta": 1.0}),
    ("sa_solver", {"eta": 0.7, "simple_order_2": True, "predictor_order": 2, "corrector_order": 2}),
    ("dpm_adaptive", {"eta": 1.0}),
])
def test_changed_settings_sample_the_data_distribution_and_s_noise_scales_the_noise(name, settings):
    """The samples of N(MU, S^2) data have its mean and spread; s_noise 2 or 0 (the fresh
    noise doubled or dropped) breaks that, so the noise is scaled where s_noise says."""
    x = _gaussian(name, **settings)
    assert abs(float(x.mean()) - MU) < TOL and abs(float(x.std()) - S) < TOL, (float(x.mean()), float(x.std()))
    for wrong in (0.0, 2.0):
        assert abs(float(_gaussian(name, s_noise=wrong, **settings).std()) - S) > 2 * TOL, wrong


def test_euler_ancestral_stepper_is_diffusers_at_eta_one_and_euler_at_eta_zero():
    sigmas = schedules.comfy_sigmas(schedules.TrainingSchedule(SD15), "karras", 10)
    x = MU + math.sqrt(S ** 2 + float(sigmas[0]) ** 2) * _noise()
    kiln = steppers.kiln_stepper_class("euler_ancestral")(SD15, sigmas)
    theirs = steppers.on_sigmas(resolve_sampler("euler_ancestral"), SD15, sigmas)
    assert type(theirs).__name__ == "EulerAncestralDiscreteScheduler"
    a = _run(kiln, x, _ideal, [torch.Generator().manual_seed(2)])
    gen = [torch.Generator().manual_seed(2)]
    y = x
    for i, t in enumerate(theirs.timesteps):
        sigma = float(sigmas[i])
        y = theirs.step((y - _ideal(y, sigma)) / sigma, t, y, generator=gen).prev_sample
    assert torch.allclose(a, y, atol=1e-4), (a - y).abs().max()
    euler = steppers.kiln_stepper_class("euler_cfg_pp")(SD15, sigmas)
    assert torch.allclose(_run(_tuned("euler_ancestral", sigmas, eta=0.0), x, _ideal, [None]),
                          _run(euler, x, _ideal, [None], unguided=None), atol=1e-6)


def test_dpm_adaptive_order_two_and_the_tolerance():
    """Order 2 takes more evaluations than order 3 for the same tolerance; a tighter rtol more
    than a looser one; each lands near the exact ODE state."""
    sigmas = torch.tensor([SIGMA0, 0.1, 0.0])
    x = MU + math.sqrt(S ** 2 + SIGMA0 ** 2) * _noise()
    exact = MU + (x - MU) * math.sqrt((S ** 2 + 0.1 ** 2) / (S ** 2 + SIGMA0 ** 2))
    counts, errors = {}, {}
    for key, settings in {"3": {}, "2": {"solver_order": 2}, "tight": {"rtol": 0.005}}.items():
        sched = _tuned("dpm_adaptive", sigmas, **settings)
        out = _run(sched, x, _ideal, [None])
        counts[key], errors[key] = sched.evaluations, float((out - exact).abs().mean())
        assert errors[key] < 0.05, key
    assert counts["2"] > counts["3"] and counts["tight"] > counts["3"], counts
    assert errors["tight"] < errors["3"] / 3, errors


# -- through the nodes on the tiny models -----------------------------------------------------

def _custom(tiny, spec, *, seed=5, steps=6, cfg=6.0, scheduler="karras", denoise=1.0):
    latent = {"samples": torch.zeros_like(tiny.init)}
    noise, = cs.random_noise(CTX, seed)
    guider, = cs.cfg_guider(CTX, tiny.model, tiny.pos, tiny.neg, cfg)
    sigmas, = cs.basic_scheduler(CTX, tiny.model, scheduler, steps, denoise)
    return cs.sampler_custom_advanced(CTX, noise, guider, spec, sigmas, latent)[0]["samples"]


def test_sampler_nodes_run_on_the_tiny_sd1(sd1):
    plain = _custom(sd1, cs.ksampler_select(CTX, "euler")[0])
    ancestral0 = _custom(sd1, ss.sampler_euler_ancestral(CTX, 0.0, 1.0)[0])
    assert (sd1.decode(ancestral0) - sd1.decode(plain)).abs().max() <= PIXEL_TOL  # eta 0 is Euler
    default = _custom(sd1, ss.sampler_dpmpp_2m_sde(CTX, "midpoint", 1.0, 1.0, "cpu")[0])
    select = _custom(sd1, cs.ksampler_select(CTX, "dpmpp_2m_sde")[0])
    assert torch.equal(default, select)
    half = _custom(sd1, ss.sampler_dpmpp_2m_sde(CTX, "midpoint", 0.5, 1.0, "cpu")[0])
    assert torch.isfinite(half).all() and (sd1.decode(half) - sd1.decode(default)).abs().max() > 0.01
    for spec in (ss.sampler_dpmpp_sde(CTX, 0.5, 1.0, 0.5, "cpu")[0], ss.sampler_lms(CTX, 2)[0],
                 ss.sampler_sa_solver(CTX, sd1.model, 0.5, 0.2, 0.8, 1.0, 2, 3, False, False)[0],
                 ss.sampler_er_sde(CTX, "ODE", 2, 1.0, 1.0)[0]):
        assert torch.isfinite(_custom(sd1, spec)).all(), spec.name


def test_sampler_nodes_on_the_tiny_flux():
    """Flow models run the settings in ComfyUI's flow forms: the RF ancestral Euler at eta 0
    is Euler; the SDE ones and SA-Solver with settings changed run; an adaptive eta is refused."""
    from test_flux import _embeds, _fixed, _init_raw, _model

    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    model, latent = _fixed(_model("dev")), {"samples": _init_raw()}
    guider, = cs.basic_guider(CTX, model, cond)
    sigmas, = cs.basic_scheduler(CTX, model, "simple", 4, 0.6)

    def run(spec):
        return cs.sampler_custom_advanced(CTX, cs.random_noise(CTX, 9)[0], guider, spec, sigmas, latent)[0]["samples"]

    euler = run(cs.ksampler_select(CTX, "euler")[0])
    assert torch.allclose(run(ss.sampler_euler_ancestral(CTX, 0.0, 1.0)[0]), euler, atol=1e-5)
    assert (run(ss.sampler_euler_ancestral(CTX, 0.5, 1.0)[0]) - euler).abs().max() > 1e-3
    default = run(cs.ksampler_select(CTX, "dpmpp_2m_sde")[0])
    for spec in (ss.sampler_dpmpp_2m_sde(CTX, "midpoint", 0.5, 1.0, "cpu")[0],
                 ss.sampler_dpmpp_3m_sde(CTX, 1.0, 0.5, "cpu")[0], ss.sampler_dpmpp_sde(CTX, 1.0, 1.0, 0.5, "cpu")[0],
                 ss.sampler_er_sde(CTX, "Reverse-time SDE", 3, 0.5, 1.0)[0]):
        out = run(spec)
        assert torch.isfinite(out).all() and (out - default).abs().max() > 1e-3, spec.name
    grown = run(ss.sampler_lcm_upscale(CTX, 2.0, -1, "bilinear")[0])  # the FLUX latent grows too
    assert grown.shape[-2:] == (2 * latent["samples"].shape[-2], 2 * latent["samples"].shape[-1])
    sa = run(ss.sampler_sa_solver(CTX, model, 0.5, 0.1, 0.9, 1.0, 2, 3, True, False)[0])
    assert torch.isfinite(sa).all() and (sa - default).abs().max() > 1e-3
    with pytest.raises(NodeError) as err:
        run(ss.sampler_dpm_adaptive(CTX, 3, 0.05, 0.0078, 0.05, 0.0, 1.0, 0.0, 0.81, 0.5, 1.0)[0])
    assert err.value.input_name == "sampler"


def test_the_flow_sde_forms_at_the_defaults_equal_diffusers_flow_schedulers():
    """Kiln's 2M SDE stepper in its flow form, at eta 1, takes the steps of diffusers'
    DPM-Solver++ SDE with flow sigmas (what KSampler runs on FLUX) with the same noise."""
    from nodes.samplers import flow

    from nodes.families import flux

    config = flux.FAMILY.scheduler_config()
    ts = torch.linspace(1.0, 0.05, 12).tolist()
    sigmas = torch.tensor([*ts, 0.0])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def velocity(x, t):  # Gaussian data under the flow x = (1 - t) x0 + t n: v = n - x0 from the ideal x0
        var = (1 - t) ** 2 * S ** 2 + t ** 2
        x0 = MU + (1 - t) * S ** 2 / var * (x - (1 - t) * MU)
        return (x - x0) / t

    def drive(sched):
        gen = [torch.Generator().manual_seed(5)]
        y = x
        for t in sched.timesteps:
            sigma = float(t) / 1000
            y = sched.step(velocity(y, max(sigma, 1e-4)), t, y, generator=gen).prev_sample
        return y

    spec = resolve_sampler("dpmpp_2m_sde")
    theirs = drive(flow.on_grid(spec, config, sigmas))
    ours = drive(sde.DPMpp2MSDE(config, sigmas))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert (drive(sde.DPMpp2MSDE(config, sigmas, eta=0.5)) - theirs).abs().max() > 1e-2


def test_euler_cfg_pp_alternative_steps_along_the_doubled_guidance():
    """SamplerEulerCFG++ "alternative" (ComfyUI's sample_euler_pp): x' = x + (x - 2 D + U) / s * (s' - s);
    "regular" is KSampler's euler_cfg_pp; without guidance (U = D) both are Euler."""
    sigmas = torch.tensor([4.0, 2.0, 0.0])
    x = MU + 4.0 * _noise()
    (alt,) = ss.sampler_euler_cfg_pp(CTX, "alternative")
    assert ss.sampler_euler_cfg_pp(CTX, "regular")[0] == resolve_sampler("euler_cfg_pp")
    stepper = steppers.follow(alt, SD15, sigmas)[0]
    guided, unguided = _ideal(x, 4.0), 0.5 * _ideal(x, 4.0)
    out = stepper.step((x - guided) / 4.0, stepper.timesteps[0], x, uncond=(x - unguided) / 4.0).prev_sample
    assert torch.allclose(out, x + (x - 2 * guided + unguided) / 4.0 * (2.0 - 4.0), atol=1e-5)
    plain = steppers.follow(alt, SD15, sigmas)[0]
    euler = plain.step((x - guided) / 4.0, plain.timesteps[0], x).prev_sample
    assert torch.allclose(euler, x + (x - guided) / 4.0 * (2.0 - 4.0), atol=1e-5)


def test_lcm_upscale_grows_the_latent_as_it_samples(sd1):
    (spec,) = ss.sampler_lcm_upscale(CTX, 2.0, -1, "bilinear")
    assert ss.sampler_lcm_upscale(CTX, 1.0, -1, "bislerp")[0] == resolve_sampler("lcm")
    out = _custom(sd1, spec, steps=4)
    assert out.shape[-2:] == (sd1.init.shape[-2] * 2, sd1.init.shape[-1] * 2) and torch.isfinite(out).all()
    # The schedule of sizes: ComfyUI's linspace over about half the steps.
    stepper = steppers.follow(spec, SD15, schedules.karras(4, 0.1, 10.0))[0]
    x = torch.zeros(1, 4, 8, 8)
    sizes = []
    for t in stepper.timesteps:
        x = stepper.step(torch.zeros_like(x), t, x, generator=[torch.Generator().manual_seed(0)]).prev_sample
        sizes.append(x.shape[-1])
    assert sizes == [12, 16, 16, 16]
    latent = {"samples": torch.zeros_like(sd1.init), "noise_mask": torch.ones(1, 1, 8, 8)}
    guider, = cs.cfg_guider(CTX, sd1.model, sd1.pos, sd1.neg, 6.0)
    sigmas, = cs.basic_scheduler(CTX, sd1.model, "karras", 4, 1.0)
    with pytest.raises(NodeError) as err:
        cs.sampler_custom_advanced(CTX, cs.random_noise(CTX, 1)[0], guider, spec, sigmas, latent)
    assert err.value.input_name == "sampler"
