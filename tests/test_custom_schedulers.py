"""ComfyUI's other sigma-list nodes (nodes/custom_schedulers.py): each list against its
formula worked out independently, the model-based ones against the model's own training
levels, and an AlignYourSteps list driving SamplerCustomAdvanced on the tiny SD1."""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes import custom_sampling as cs
from nodes import custom_schedulers as sch
from nodes.samplers import schedules
from test_sampling import Recorder, sd1  # noqa: F401 (sd1 is a fixture)

CTX = Recorder().ctx


def test_exponential_is_even_in_log_sigma_and_polyexponential_bends_it():
    (exp,) = sch.exponential_scheduler(CTX, 5, 10.0, 0.1)
    assert len(exp) == 6 and exp[-1] == 0 and exp.dtype == torch.float32
    assert exp[0].item() == pytest.approx(10.0) and exp[-2].item() == pytest.approx(0.1)
    ratios = exp[1:-1] / exp[:-2]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.01 ** 0.25), rtol=1e-5)
    (poly1,) = sch.polyexponential_scheduler(CTX, 5, 10.0, 0.1, 1.0)
    assert torch.equal(poly1, exp)
    (poly2,) = sch.polyexponential_scheduler(CTX, 5, 10.0, 0.1, 2.0)
    # ramp^2 at the middle is 0.25: log sigma a quarter of the way up from sigma_min
    assert poly2[2].item() == pytest.approx(math.exp(math.log(0.1) + 0.25 * math.log(100)), rel=1e-5)
    with pytest.raises(NodeError) as err:
        sch.exponential_scheduler(CTX, 5, 0.1, 10.0)
    assert err.value.input_name == "sigma_max"


def test_laplace_centres_on_e_to_the_mu_and_ends_without_zero_as_comfyui():
    (levels,) = sch.laplace_scheduler(CTX, 21, 14.6, 0.03, 1.0, 0.5)
    assert len(levels) == 21 and levels[-1] > 0  # no final 0
    assert levels[10].item() == pytest.approx(math.e, rel=1e-5)  # x = 0.5: log sigma = mu
    assert levels[0].item() == pytest.approx(14.6) and levels[-1].item() == pytest.approx(0.03)  # clamped
    assert bool((levels[:-1] >= levels[1:]).all())
    gaps = (levels[:-1].log() - levels[1:].log())
    assert gaps[9] < gaps[2]  # dense in log sigma around e^mu


def test_vp_follows_the_continuous_vp_formula():
    (levels,) = sch.vp_scheduler(CTX, 4, 19.9, 0.1, 0.001)
    t = [1.0, 1 - 0.999 / 3, 1 - 2 * 0.999 / 3, 0.001]
    expected = [math.sqrt(math.expm1(19.9 * v * v / 2 + 0.1 * v)) for v in t]
    assert levels[:-1].tolist() == pytest.approx(expected, rel=1e-5) and levels[-1] == 0


def test_align_your_steps_gives_the_published_levels_and_interpolates_in_log_sigma():
    (ten,) = sch.align_your_steps_scheduler(CTX, "SD1", 10, 1.0)
    assert ten[:-1].tolist() == pytest.approx(list(sch.AYS_LEVELS["SD1"][:-1]), rel=1e-6) and ten[-1] == 0
    (twenty,) = sch.align_your_steps_scheduler(CTX, "SDXL", 20, 1.0)
    assert len(twenty) == 21 and twenty[-1] == 0
    # 21 points evenly in [0, 1] hold the 11 published ones at every other position
    assert twenty[:-1:2].tolist() == pytest.approx(list(sch.AYS_LEVELS["SDXL"][:-1]), rel=1e-5)
    mid = math.sqrt(sch.AYS_LEVELS["SDXL"][0] * sch.AYS_LEVELS["SDXL"][1])
    assert twenty[1].item() == pytest.approx(mid, rel=1e-5)  # halfway in log sigma
    (half,) = sch.align_your_steps_scheduler(CTX, "SD1", 10, 0.5)
    assert half[:-1].tolist() == pytest.approx(list(sch.AYS_LEVELS["SD1"][5:10]), rel=1e-6) and half[-1] == 0
    assert len(sch.align_your_steps_scheduler(CTX, "SD1", 10, 0.0)[0]) == 0


def test_sd_turbo_and_beta_pick_the_models_training_levels(sd1):
    train = schedules.TrainingSchedule(sd1.model.scheduler_config)
    (turbo,) = sch.sd_turbo_scheduler(CTX, sd1.model, 2, 0.5)
    assert turbo.tolist() == pytest.approx([float(train.sigmas[499]), float(train.sigmas[399]), 0.0], rel=1e-6)
    (one,) = sch.sd_turbo_scheduler(CTX, sd1.model, 1, 1.0)
    assert one.tolist() == pytest.approx([float(train.sigmas[999]), 0.0], rel=1e-6)
    (beta,) = sch.beta_sampling_scheduler(CTX, sd1.model, 8, 0.6, 0.6)
    assert torch.equal(beta, schedules.comfy_schedule(train, "beta", 8))  # KSampler's comfy-grid ``beta``
    (flat,) = sch.beta_sampling_scheduler(CTX, sd1.model, 4, 1.0, 1.0)  # uniform quantiles: even timesteps
    picks = [round((1 - k / 4) * 999) for k in range(4)]
    assert flat.tolist() == pytest.approx([float(train.sigmas[t]) for t in picks] + [0.0], rel=1e-6)


def test_sd_turbo_refuses_a_flow_model_naming_model():
    from test_flux import _model

    with pytest.raises(NodeError) as err:
        sch.sd_turbo_scheduler(CTX, _model("dev"), 1, 1.0)
    assert err.value.input_name == "model" and "flow" in str(err.value)


def test_beta_sampling_scheduler_picks_comfyuis_flow_table():
    """On a flow model ComfyUI's BetaSamplingScheduler picks from model_sampling.sigmas: the shifted flow
    times at t = 1/1000 .. 1 (FLUX [dev] at ComfyUI's default shift, mu = 1.15); written out here."""
    import math

    import numpy as np
    from scipy.stats import beta as beta_dist
    from test_flux import _model

    (ours,) = sch.beta_sampling_scheduler(CTX, _model("dev"), 6, 0.4, 0.4)
    table = [math.exp(1.15) / (math.exp(1.15) + (1000 / (i + 1) - 1)) for i in range(1000)]
    picks = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, 6, endpoint=False), 0.4, 0.4) * 999).astype(int)
    hand = [table[t] for k, t in enumerate(picks) if k == 0 or t != picks[k - 1]] + [0.0]
    assert ours.tolist() == pytest.approx(hand, abs=1e-6) and len(hand) == 7 and hand[0] == pytest.approx(1.0)


def test_set_first_and_extend_intermediate_edit_a_list():
    base = torch.tensor([14.0, 10.0, 5.0, 0.0])
    (first,) = sch.set_first_sigma(CTX, base, 20.0)
    assert first.tolist() == [20.0, 10.0, 5.0, 0.0] and base[0] == 14.0
    with pytest.raises(NodeError) as err:
        sch.set_first_sigma(CTX, torch.zeros(0), 1.0)
    assert err.value.input_name == "sigmas"
    (linear,) = sch.extend_intermediate_sigmas(CTX, base, 2, -1.0, 12.0, "linear")
    assert linear.tolist() == [14.0, 12.0, 10.0, 5.0, 0.0]  # only the step starting at or above 12
    (everywhere,) = sch.extend_intermediate_sigmas(CTX, base, 3, -1.0, 0.0, "cosine")
    assert len(everywhere) == 4 + 3 * 2
    assert everywhere[1].item() == pytest.approx(14 - 4 * math.sin(math.pi / 6), rel=1e-6)
    (capped,) = sch.extend_intermediate_sigmas(CTX, base, 2, 9.0, 0.0, "sine")
    sine = 5 - 5 * (1 - math.cos(math.pi / 4))
    assert capped.tolist() == pytest.approx([14.0, 10.0, 5.0, sine, 0.0])  # 14 and 10 are above start_at_sigma


def test_sampling_percent_to_sigma_is_the_timestep_range_rule(sd1):
    train = schedules.TrainingSchedule(sd1.model.scheduler_config)
    (mid,) = sch.sampling_percent_to_sigma(CTX, sd1.model, 0.5, False)
    assert mid == pytest.approx(float(train.sigma(499.5)), rel=1e-6)
    assert sch.sampling_percent_to_sigma(CTX, sd1.model, 0.0, False) == (sch.ABOVE_EVERY_LEVEL,)
    assert sch.sampling_percent_to_sigma(CTX, sd1.model, 1.0, False) == (0.0,)
    (top,) = sch.sampling_percent_to_sigma(CTX, sd1.model, 0.0, True)
    (bottom,) = sch.sampling_percent_to_sigma(CTX, sd1.model, 1.0, True)
    assert top == pytest.approx(train.sigma_max) and bottom == pytest.approx(train.sigma_min)


def test_an_align_your_steps_list_drives_sampler_custom_advanced(sd1):
    guider, = cs.cfg_guider(CTX, sd1.model, sd1.pos, sd1.neg, 7.0)
    spec, = cs.ksampler_select(CTX, "dpmpp_2m")
    (sigmas,) = sch.align_your_steps_scheduler(CTX, "SD1", 4, 1.0)
    rec = Recorder()
    out, denoised = cs.sampler_custom_advanced(rec.ctx, cs.random_noise(CTX, 3)[0], guider, spec, sigmas,
                                               {"samples": torch.zeros_like(sd1.init)})
    assert torch.isfinite(out["samples"]).all() and rec.steps[-1][1] == 4
    (karras,) = cs.karras_scheduler(CTX, 4, float(sigmas[0]), float(sigmas[-2]), 7.0)
    other, _ = cs.sampler_custom_advanced(CTX, cs.random_noise(CTX, 3)[0], guider, spec, karras,
                                          {"samples": torch.zeros_like(sd1.init)})
    assert (other["samples"] - out["samples"]).abs().max() > 1e-3  # the levels matter: another list, another result
