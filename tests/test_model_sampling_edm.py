"""Continuous-time EDM sampling: ModelSamplingContinuousEDM / ModelSamplingContinuousV (nodes.samplers.edm).

On Gaussian data x0 ~ N(MU, S^2) the clean-latent prediction is known in closed form, so a
fake network that answers with the output each prediction type implies (written from the
textbook preconditioning, Karras et al. 2022 table 1, not from Kiln's code) must carry every
sampler to the exact end of the probability-flow ODE (deterministic ones) or to data of
spread S (stochastic ones). diffusers' EDMEulerScheduler driving the tiny SDXL pipeline gives
the same pixels as KSampler on the node; the node changes the image, keeps the loaded MODEL
as it was, and names the input it refuses. A CosXL file (SDXL with edm_vpred keys) samples as
the same weights on the node; Playground v2.5 (the node's edm_playground_v2.5, its single files
and diffusers folders) equals diffusers' SDXL pipeline with its VAE statistics.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engine.context import NodeError
from nodes.custom_sampling import (basic_scheduler, ksampler_select, model_sampling_continuous_edm,
                                   model_sampling_continuous_v, random_noise, sampler_custom)
from nodes.latent import add_noise, empty_latent_image
from nodes.samplers import edm, schedules
from nodes.samplers.names import SAMPLERS, resolve_sampler
from nodes.sampling import ksampler
from test_sampling import PIXEL_TOL, Recorder, Tiny

MU, S = 0.5, 0.8
SIGMA_MAX, SIGMA_MIN = 120.0, 0.002
#: (ComfyUI's sampling choice, Kiln's prediction type, sigma_data the node sets)
KINDS = [("eps", "epsilon", 1.0), ("v_prediction", "v_prediction", 1.0), ("edm", "edm", 0.5)]


def _network(prediction: str, sigma_data: float, time: str):
    """The ideal network for Gaussian data: from its input and time input alone, it recovers the
    state (undoing c_in) and answers with what ``prediction`` asks for."""

    def net(model_in: torch.Tensor, t) -> torch.Tensor:
        t = float(t)
        sigma = math.tan(t * math.pi / 2) if time == "atan" else math.exp(4 * t)
        x = model_in * math.sqrt(sigma ** 2 + sigma_data ** 2)
        x0 = MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / math.sqrt(sigma ** 2 + sigma_data ** 2)
        if prediction == "epsilon":
            return (x - x0) / sigma
        if prediction == "v_prediction":
            return (c_skip * x - x0) / c_out
        return (x0 - c_skip * x) / c_out  # Karras et al.'s F

    return net


def _sample(name: str, config: dict, net, steps: int, scheduler: str = "karras") -> tuple[torch.Tensor, torch.Tensor]:
    """(result, exact ODE end) of ``steps`` steps from pure noise, run as the sampling loop runs."""
    ts = edm.EDMSchedule(config)
    sigmas = schedules.comfy_sigmas(ts, scheduler, steps)
    sched = edm.follow(resolve_sampler(name), config, sigmas)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x = MU + edm.start(ts, float(sigmas[0]), noise, torch.zeros_like(noise))
    exact = MU + (x - MU) * S / math.sqrt(S ** 2 + float(sigmas[0]) ** 2)
    generators = [torch.Generator().manual_seed(1)]
    for t in sched.timesteps:  # dpm_adaptive adds evaluations to this list as it goes
        out = net(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=generators).prev_sample
    return x, exact


# -- (a) the preconditioning, with an ideal denoiser ------------------------------------------

@pytest.mark.parametrize("time", ["log", "atan"])
@pytest.mark.parametrize("choice,prediction,sigma_data", KINDS)
def test_each_prediction_type_follows_the_gaussian_flow_to_its_exact_end(choice, prediction, sigma_data, time):
    config = edm.edm_config(prediction, SIGMA_MIN, SIGMA_MAX, sigma_data, time)
    net = _network(prediction, sigma_data, time)
    errors = []
    for steps in (12, 24, 48):
        out, exact = _sample("heun", config, net, steps)
        errors.append((out - exact).abs().mean().item())
    assert errors[-1] < 1e-2
    assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0  # Heun's second order
    assert abs(out.mean().item() - MU) < 0.05 and abs(out.std().item() - S) < 0.05
    # Not vacuous: the same outputs read with another preconditioning miss badly.
    other = "edm" if prediction == "v_prediction" else "v_prediction"
    wrong, exact = _sample("heun", edm.edm_config(other, SIGMA_MIN, SIGMA_MAX, sigma_data, time), net, 48)
    assert (wrong - exact).abs().mean().item() > 0.1


def test_the_network_time_is_comfyuis_rule_for_each_node():
    sigmas = torch.tensor([80.0, 3.0, 0.5, 0.01])
    log = edm.EDMSchedule(edm.edm_config("edm", SIGMA_MIN, SIGMA_MAX, 0.5, "log"))
    atan = edm.EDMSchedule(edm.edm_config("v_prediction", 0.03, 500.0, 1.0, "atan"))
    assert torch.allclose(log.timestep(sigmas), 0.25 * sigmas.log())
    assert torch.allclose(atan.timestep(sigmas), sigmas.atan() * 2 / math.pi)
    assert torch.allclose(log.sigma(log.timestep(sigmas)), sigmas, rtol=1e-5)
    assert torch.allclose(atan.sigma(atan.timestep(sigmas)), sigmas, rtol=1e-4)
    # the steppers hand the network exactly these times
    sched = edm.follow(resolve_sampler("euler"), edm.edm_config("edm", SIGMA_MIN, SIGMA_MAX, 0.5),
                       torch.tensor([80.0, 3.0, 0.5, 0.0]))
    assert torch.allclose(sched.timesteps, 0.25 * torch.tensor([80.0, 3.0, 0.5]).log())
    # ComfyUI's percent -> sigma on EDM models: log-linear over the range
    assert math.isclose(log.percent_to_sigma(0.5), math.sqrt(SIGMA_MIN * SIGMA_MAX), rel_tol=1e-9)
    assert math.isinf(log.percent_to_sigma(0.0)) and log.percent_to_sigma(1.0) == 0.0
    # ComfyUI's "normal" schedule is even in network time: for the log rule, even in log sigma
    normal = schedules.comfy_sigmas(log, "normal", 9)
    assert torch.allclose(normal, schedules.polyexponential(9, SIGMA_MIN, SIGMA_MAX).float(), rtol=1e-4)


def test_every_sampler_name_runs_on_an_edm_model():
    """Each of KSampler's names lands on the flow's end (deterministic ones) or on data of the right
    spread (the ones that draw noise) with the ideal EDM network; none is refused. (lcm jumps to
    each prediction and renoises: with a network that is not consistency-distilled it shrinks
    the spread, on SD as here, so only its mean is checked; dpm_adaptive picks its own steps to
    ComfyUI's tolerances, rtol 0.05, rather than to a step count.)"""
    config = edm.edm_config("edm", SIGMA_MIN, SIGMA_MAX, 0.5)
    net = _network("edm", 0.5, "log")
    misses = {}
    for spec in SAMPLERS:
        out, exact = _sample(spec.name, config, net, 64)
        if spec.name == "lcm":
            if abs(out.mean().item() - MU) > 0.05:
                misses[spec.name] = out.mean().item()
        elif spec.stochastic:
            if abs(out.std().item() - S) > 0.1 or abs(out.mean().item() - MU) > 0.05:
                misses[spec.name] = (out.mean().item(), out.std().item())
        elif (out - exact).abs().mean().item() > (0.1 if spec.name == "dpm_adaptive" else 0.05):
            misses[spec.name] = (out - exact).abs().mean().item()
    assert not misses


# -- (b) parity with diffusers' EDMEulerScheduler ---------------------------------------------

@pytest.fixture(scope="module")
def sdxl() -> Tiny:
    return Tiny("sdxl")


def _edm_model(tiny: Tiny, sampling: str, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN):
    return model_sampling_continuous_edm(Recorder().ctx, tiny.model, sampling, sigma_max, sigma_min)[0]


def _txt2img(tiny: Tiny, model, sampler: str = "euler", scheduler: str = "karras", seed: int = 5) -> torch.Tensor:
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, model, seed, 8, 6.0, sampler, scheduler, tiny.pos, tiny.neg, empty)
    return tiny.decode(out["samples"])


@pytest.mark.parametrize("sampling,diffusers_prediction,sigma_data", [("edm", "epsilon", 0.5),
                                                                      ("v_prediction", "v_prediction", 1.0)])
def test_ksampler_euler_karras_equals_diffusers_edm_euler(sdxl, sampling, diffusers_prediction, sigma_data):
    """diffusers' EDM schedulers call Karras et al.'s F-prediction "epsilon" (their c_out has the
    EDM sign), so ComfyUI's "edm" is their epsilon at sigma_data 0.5; ComfyUI's v_prediction runs
    at sigma_data 1. Both time the network with 0.25 log sigma and scale its input by c_in."""
    import diffusers

    pipe = sdxl.diffusers_pipe("txt2img", "euler")
    pipe.scheduler = diffusers.EDMEulerScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=sigma_data,
                                                 prediction_type=diffusers_prediction, sigma_schedule="karras")
    ref = pipe(height=64, width=64, num_inference_steps=8, guidance_scale=6.0, output_type="pt",
               generator=torch.Generator().manual_seed(5), **sdxl.embeds).images.permute(0, 2, 3, 1)
    ours = _txt2img(sdxl, _edm_model(sdxl, sampling))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # (c) not vacuous: the node changed the image
    assert (ours - _txt2img(sdxl, sdxl.model)).abs().max().item() > 0.05


def test_custom_sampling_nodes_give_ksamplers_result(sdxl):
    model = _edm_model(sdxl, "v_prediction")
    ctx = Recorder().ctx
    sigmas, = basic_scheduler(ctx, model, "karras", 8, 1.0)
    assert math.isclose(float(sigmas[0]), SIGMA_MAX, rel_tol=1e-6) and float(sigmas[-1]) == 0.0
    empty, = empty_latent_image(ctx, 64, 64, 1)
    out, _ = sampler_custom(ctx, model, True, 5, 6.0, sdxl.pos, sdxl.neg, ksampler_select(ctx, "euler")[0], sigmas,
                            empty)
    assert (sdxl.decode(out["samples"]) - _txt2img(sdxl, model)).abs().max().item() <= 1e-5
    assert random_noise(ctx, 5)[0].seed == 5


def test_continuous_v_times_the_network_with_atan(sdxl):
    seen = []
    unet = sdxl.parts["unet"]
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1].flatten()[0])))
    try:
        model, = model_sampling_continuous_v(Recorder().ctx, sdxl.model, "v_prediction", 500.0, 0.03)
        _txt2img(sdxl, model)
    finally:
        hook.remove()
    expected = (schedules.karras(8, 0.03, 500.0)[:-1].atan() * 2 / math.pi).tolist()
    assert seen == pytest.approx(expected, rel=1e-5)


def test_image_to_image_modes_start_inside_the_edm_range(sdxl):
    """AddNoise's strength, ComfyUI's denoise and a noise mask all run on the EDM levels: the
    tail of the schedule, the kept region exactly the input."""
    model = _edm_model(sdxl, "v_prediction")
    rec = Recorder()
    init = {"samples": sdxl.init}
    before = sdxl.decode(sdxl.init)
    noised, = add_noise(rec.ctx, model, init, 0.5, 3)
    by_strength, = ksampler(rec.ctx, model, 3, 8, 6.0, "dpmpp_2m", "karras", sdxl.pos, sdxl.neg, noised)
    by_denoise, = ksampler(rec.ctx, model, 3, 8, 6.0, "dpmpp_2m", "karras", sdxl.pos, sdxl.neg, init, 0.5)
    for out in (by_strength, by_denoise):
        change = (sdxl.decode(out["samples"]) - before).abs().max().item()
        assert 0.01 < change
    # denoise 0.5 runs the quiet half of a 16-step list: it stays nearer the input than from pure noise
    full, = ksampler(rec.ctx, model, 3, 8, 6.0, "dpmpp_2m", "karras", sdxl.pos, sdxl.neg, init, 1.0)
    assert (by_denoise["samples"] - sdxl.init).abs().mean() < (full["samples"] - sdxl.init).abs().mean()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    masked, = ksampler(rec.ctx, model, 3, 8, 6.0, "euler", "karras", sdxl.pos, sdxl.neg,
                       {"samples": sdxl.init, "noise_mask": mask}, 0.7)
    assert torch.equal(masked["samples"][..., :3], sdxl.init[..., :3])  # column 3 borders the resized mask
    assert (masked["samples"][..., 4:] - sdxl.init[..., 4:]).abs().max() > 0.01


def test_an_uncovered_area_predicts_a_zero_clean_latent_with_the_edm_preconditioning():
    from nodes.families.conditioning import fill_uncovered
    from nodes.samplers.kdiffusion import denoised_from

    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * 5
    covered = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    for sigma in (40.0, 1.0, 0.05):
        model_in = x / math.sqrt(sigma ** 2 + 0.25)
        out = fill_uncovered(torch.ones_like(x), covered, model_in, sigma, "edm", 0.5)
        assert denoised_from("edm", out, x, sigma, 0.5).abs().max() < 1e-4


def test_rescale_cfg_and_guidance_rules_read_the_edm_preconditioning(sdxl):
    """ComfyUI's RescaleCFG rescales the velocity measured on x / (1 + sigma^2) whatever the model's
    preconditioning: on an F-prediction model Kiln goes there through the clean predictions. The
    guidance rules' output <-> clean-latent map inverts the samplers' own rule."""
    from nodes.families.denoiser import guide, rescale_guidance
    from nodes.families.guidance_rules import Parametrisation
    from nodes.model_patches import rescale_cfg
    from nodes.samplers.kdiffusion import denoised_from

    gen = torch.Generator().manual_seed(9)
    x, den_c, den_u = (torch.randn(2, 4, 8, 8, generator=gen) * k for k in (3.0, 1.0, 1.0))
    dims = (1, 2, 3)
    for sigma in (30.0, 1.5, 0.1):
        space = Parametrisation("edm", x / math.sqrt(sigma ** 2 + 0.25), sigma, 0.5)
        assert torch.allclose(space.to_x0(space.from_x0(den_c)), den_c, atol=1e-4)
        guided = guide(space.from_x0(den_c), space.from_x0(den_u), 5.0)
        out = rescale_guidance(guided, space.from_x0(den_c), space.z, sigma, "edm", 0.7, 0.5)
        # ComfyUI's rescale_cfg on its x (the state) and the two clean predictions
        vp = x / (sigma ** 2 + 1)
        v_c, v_u = ((vp - d) * math.sqrt(sigma ** 2 + 1) / sigma for d in (den_c, den_u))
        v_cfg = v_u + 5.0 * (v_c - v_u)
        v_final = 0.7 * v_cfg * (v_c.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)) + 0.3 * v_cfg
        expected = vp - v_final * sigma / math.sqrt(sigma ** 2 + 1)
        assert torch.allclose(denoised_from("edm", out, x, sigma, 0.5), expected, atol=1e-4)
    model = _edm_model(sdxl, "edm")
    rescaled, = rescale_cfg(Recorder().ctx, model, 0.7)
    assert (_txt2img(sdxl, rescaled) - _txt2img(sdxl, model)).abs().max().item() > 1e-3


def test_table_schedulers_pick_from_the_edm_levels(sdxl):
    """SDTurboScheduler and BetaSamplingScheduler index the model's 1000-level table, on an EDM model
    (as in ComfyUI) the levels evenly spaced in log sigma over its range."""
    from nodes.custom_schedulers import beta_sampling_scheduler, sd_turbo_scheduler

    model = _edm_model(sdxl, "edm", 80.0, 0.002)
    turbo, = sd_turbo_scheduler(Recorder().ctx, model, 2, 1.0)
    table = edm.EDMSchedule(model.scheduler_config).sigmas
    assert torch.equal(turbo, torch.cat([table[[999, 899]], torch.zeros(1)]))
    assert math.isclose(float(turbo[0]), 80.0, rel_tol=1e-6)
    beta, = beta_sampling_scheduler(Recorder().ctx, model, 6, 0.6, 0.6)
    assert math.isclose(float(beta[0]), 80.0, rel_tol=1e-6) and float(beta[-1]) == 0.0


# -- (d) the handle stays frozen; bad input names the input ------------------------------------

def test_the_loaded_model_keeps_its_sampling(sdxl):
    before = dict(sdxl.model.scheduler_config)
    model = _edm_model(sdxl, "edm_playground_v2.5")
    assert sdxl.model.scheduler_config == before and model is not sdxl.model
    assert model.scheduler_config["prediction_type"] == "edm" and model.scheduler_config["sigma_data"] == 0.5
    assert edm.is_edm(model.scheduler_config) and not edm.is_edm(before)
    # ModelSamplingDiscrete after it goes back to the family's DDPM schedule, as ComfyUI's replaces the sampling
    from nodes.custom_sampling import model_sampling_discrete

    back, = model_sampling_discrete(Recorder().ctx, model, "eps", False)
    assert not edm.is_edm(back.scheduler_config) and back.scheduler_config["num_train_timesteps"] == 1000


@pytest.mark.parametrize("sampling,sigma_max,sigma_min,input_name", [
    ("lcm", 120.0, 0.002, "sampling"),
    ("edm", 120.0, 0.0, "sigma_min"), ("edm", 0.001, 0.002, "sigma_max")])
def test_bad_input_names_the_input(sdxl, sampling, sigma_max, sigma_min, input_name):
    with pytest.raises(NodeError) as err:
        _edm_model(sdxl, sampling, sigma_max, sigma_min)
    assert err.value.input_name == input_name
    with pytest.raises(NodeError) as err:
        model_sampling_continuous_v(Recorder().ctx, sdxl.model, "edm", 500.0, 0.03)
    assert err.value.input_name == "sampling"


def test_a_flow_model_is_refused(sdxl):
    flux_like = dataclasses.replace(sdxl.model, scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(NodeError) as err:
        model_sampling_continuous_edm(Recorder().ctx, flux_like, "edm", SIGMA_MAX, SIGMA_MIN)
    assert err.value.input_name == "model"


# -- CosXL files: the checkpoint's edm_vpred keys ----------------------------------------------

@pytest.fixture(scope="module")
def cosxl_env(tmp_path_factory):
    """A models folder with the tiny SDXL as it is and with CosXL's two keys (sigma_max 80, sigma_min
    2^-6, both exact in float32), and one with sigma_max alone."""
    from safetensors.torch import load_file, save_file

    import tiny_models as tm
    from node_call import environment_over

    root = tmp_path_factory.mktemp("cosxl-models")
    plain = tm.save_single_file("sdxl", root / "checkpoints" / "tiny-sdxl.safetensors")
    state = load_file(str(plain))
    save_file({**state, "edm_vpred.sigma_max": torch.tensor(80.0), "edm_vpred.sigma_min": torch.tensor(2.0 ** -6)},
              str(root / "checkpoints" / "tiny-cosxl.safetensors"))
    save_file({**state, "edm_vpred.sigma_max": torch.tensor(120.0)}, str(root / "checkpoints" / "tiny-cosxl-max.safetensors"))
    save_file({**state, "edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)},
              str(root / "checkpoints" / "tiny-playground.safetensors"))
    _save_playground_folder(root / "checkpoints" / "tiny-playground-diffusers")
    yield from environment_over(root, tmp_path_factory.mktemp("cosxl-data"))


def test_a_cosxl_file_loads_with_edm_v_prediction_and_samples_as_the_node_would(cosxl_env):
    from node_call import call
    from nodes import loaders, text

    cosxl, clip, _ = call(loaders.checkpoint_loader, cosxl_env, ckpt_name="tiny-cosxl.safetensors")
    plain, _, _ = call(loaders.checkpoint_loader, cosxl_env, ckpt_name="tiny-sdxl.safetensors")
    config = cosxl.scheduler_config
    assert edm.is_edm(config) and config["prediction_type"] == "v_prediction"
    assert (config["sigma_min"], config["sigma_max"], config["sigma_data"]) == (2.0 ** -6, 80.0, 1.0)
    assert not edm.is_edm(plain.scheduler_config)
    patched, = call(model_sampling_continuous_edm, cosxl_env, model=plain, sampling="v_prediction", sigma_max=80.0,
                    sigma_min=2.0 ** -6)
    pos = call(text.clip_text_encode, cosxl_env, text="a red barn", clip=clip)[0]
    neg = call(text.clip_text_encode, cosxl_env, text="", clip=clip)[0]
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    run = lambda model: call(ksampler, cosxl_env, model=model, seed=4, steps=6, cfg=5.0, sampler_name="euler",  # noqa: E731
                             scheduler="karras", positive=pos, negative=neg, latent_image=empty, denoise=1.0)[0]
    ours = run(cosxl)["samples"]
    assert torch.equal(ours, run(patched)["samples"])
    assert (ours - run(plain)["samples"]).abs().max() > 0.05  # the file's sampling is not the DDPM one
    alone, _, _ = call(loaders.checkpoint_loader, cosxl_env, ckpt_name="tiny-cosxl-max.safetensors")
    assert (alone.scheduler_config["sigma_min"], alone.scheduler_config["sigma_max"]) == (0.002, 120.0)


# -- Playground v2.5: EDM prediction in its own latent space -----------------------------------

def _playground_parts(scheduler: str = "EDMDPMSolverMultistepScheduler") -> dict:
    """The tiny SDXL with Playground's VAE config (scale 0.5, per-channel latent statistics, as the
    real one's) and one of diffusers' EDM schedulers as Playground's pipeline config sets it."""
    import diffusers

    import tiny_models as tm
    from nodes.families.sdxl import PLAYGROUND_LATENT

    parts = dict(tm.components("sdxl"))
    config = {k: v for k, v in parts["vae"].config.items() if k != "_use_default_values"}  # else from_config drops ours
    vae = diffusers.AutoencoderKL.from_config({**config, "scaling_factor": 0.5,
                                               "latents_mean": list(PLAYGROUND_LATENT.mean),
                                               "latents_std": list(PLAYGROUND_LATENT.std)})
    vae.load_state_dict(parts["vae"].state_dict())
    parts["vae"] = vae.eval()
    parts["scheduler"] = getattr(diffusers, scheduler)(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                                       prediction_type="epsilon")
    return parts


def _save_playground_folder(folder) -> None:
    import tiny_models as tm

    tm.save_diffusers("sdxl", folder, parts=_playground_parts())


@pytest.mark.parametrize("sampler,scheduler", [("euler", "EDMEulerScheduler"),
                                               ("dpmpp_2m", "EDMDPMSolverMultistepScheduler")])
def test_playground_equals_diffusers_sdxl_pipeline_with_its_vae_statistics(sdxl, sampler, scheduler):
    import tiny_models as tm

    parts = _playground_parts(scheduler)
    pipe = tm.pipeline("sdxl", parts=parts)
    ref = pipe(height=64, width=64, num_inference_steps=8, guidance_scale=6.0, output_type="pt",
               generator=torch.Generator().manual_seed(5), **sdxl.embeds).images.permute(0, 2, 3, 1)
    model = _edm_model(sdxl, "edm_playground_v2.5", 80.0, 0.002)
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, model, 5, 8, 6.0, sampler, "karras", sdxl.pos, sdxl.neg, empty)
    ours = tm.decode(parts["vae"], out["samples"])
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # not vacuous: plain EDM (the SDXL latent space) decodes to another image
    plain, = ksampler(rec.ctx, _edm_model(sdxl, "edm", 80.0, 0.002), 5, 8, 6.0, sampler, "karras", sdxl.pos,
                      sdxl.neg, empty)
    assert (tm.decode(parts["vae"], plain["samples"]) - ours).abs().max().item() > 0.05


def test_playground_latent_space_round_trips_and_image_to_image_starts_from_the_image(sdxl):
    from nodes.families.sdxl import PLAYGROUND_LATENT

    raw = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 6
    model_space = PLAYGROUND_LATENT.to_model(raw)
    mean = torch.tensor(PLAYGROUND_LATENT.mean).view(1, 4, 1, 1)
    std = torch.tensor(PLAYGROUND_LATENT.std).view(1, 4, 1, 1)
    assert torch.allclose(model_space, (raw - mean) * 0.5 / std)
    assert torch.allclose(PLAYGROUND_LATENT.from_model(model_space), raw, atol=1e-5)
    # image to image starts from the image in Playground's space: one step at a small sigma keeps it close
    model = _edm_model(sdxl, "edm_playground_v2.5", 80.0, 0.002)
    rec = Recorder()
    out, = ksampler(rec.ctx, model, 3, 1, 6.0, "euler", "karras", sdxl.pos, sdxl.neg, {"samples": sdxl.init}, 0.01)
    assert 0 < (out["samples"] - sdxl.init).abs().max() < 0.05 * sdxl.init.abs().max()


def test_playground_files_and_folders_load_with_their_sampling_and_latent_space(cosxl_env, sdxl):
    import diffusers

    from node_call import call
    from nodes import loaders, text, vae as vae_nodes
    from nodes.families.sdxl import PLAYGROUND_LATENT, ChannelLatentFormat

    single, _, _ = call(loaders.checkpoint_loader, cosxl_env, ckpt_name="tiny-playground.safetensors")
    assert single.latent == PLAYGROUND_LATENT
    assert single.scheduler_config == edm.edm_config("edm", 0.002, 80.0, 0.5)
    model, clip, vae = call(loaders.checkpoint_loader, cosxl_env, ckpt_name="tiny-playground-diffusers")
    assert isinstance(model.latent, ChannelLatentFormat) and model.latent.scale == 0.5
    assert model.latent.mean == pytest.approx(PLAYGROUND_LATENT.mean) and model.scheduler_config["prediction_type"] == "edm"
    pos = call(text.clip_text_encode, cosxl_env, text="a red barn", clip=clip)[0]
    neg = call(text.clip_text_encode, cosxl_env, text="blurry", clip=clip)[0]
    out, = call(ksampler, cosxl_env, model=model, seed=6, steps=8, cfg=5.0, sampler_name="dpmpp_2m",
                scheduler="karras", positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)},
                denoise=1.0)
    ours = call(vae_nodes.vae_decode, cosxl_env, samples=out, vae=vae)[0]
    folder = cosxl_env.paths.models.root / "checkpoints" / "tiny-playground-diffusers"
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(height=64, width=64, num_inference_steps=8, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(6), prompt_embeds=pos[0][0], negative_prompt_embeds=neg[0][0],
               pooled_prompt_embeds=pos[0][1]["pooled_output"],
               negative_pooled_prompt_embeds=neg[0][1]["pooled_output"]).images.permute(0, 2, 3, 1)
    assert type(pipe.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    assert (ours - ref).abs().max().item() <= PIXEL_TOL


def test_a_comfyui_cosxl_prompt_runs_unchanged(cosxl_env):
    """ComfyUI's API prompt for a CosXL-style graph (the node between the loader and KSampler)
    gives the same latent as the file that carries the same sigmas in its edm_vpred keys."""
    import nodes
    from engine import types as T
    from engine.executor import Executor
    from engine.node import Input, Result, define_node
    from engine.registry import Registry
    from engine.workflow import parse

    @define_node("LatentChecksum", output_node=True, inputs=[Input("samples", T.LATENT)])
    def checksum(ctx, samples):
        return Result(ui={"sum": [float(samples["samples"].double().abs().sum())]})

    registry = Registry()
    nodes.register(registry)
    registry.add(checksum)
    executor = Executor(registry, cosxl_env)

    def prompt(ckpt: str, patched: bool) -> dict:
        model = ["2", 0] if patched else ["1", 0]
        doc = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red barn", "clip": ["1", 1]}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {"model": model, "seed": 8, "steps": 5, "cfg": 4.0,
                                                       "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                       "positive": ["3", 0], "negative": ["4", 0],
                                                       "latent_image": ["5", 0], "denoise": 1.0}},
            "7": {"class_type": "LatentChecksum", "inputs": {"samples": ["6", 0]}},
        }
        if patched:
            doc["2"] = {"class_type": "ModelSamplingContinuousEDM",
                        "inputs": {"model": ["1", 0], "sampling": "v_prediction", "sigma_max": 120.0,
                                   "sigma_min": 0.002}}
        return doc

    by_node = executor.run(parse(prompt("tiny-sdxl.safetensors", True)))
    by_file = executor.run(parse(prompt("tiny-cosxl-max.safetensors", False)))
    plain = executor.run(parse(prompt("tiny-sdxl.safetensors", False)))
    assert by_node.status == by_file.status == plain.status == "succeeded", (by_node.error, by_file.error)
    assert by_node.outputs["7"]["sum"] == pytest.approx(by_file.outputs["7"]["sum"], rel=1e-6)
    assert by_node.outputs["7"]["sum"] != pytest.approx(plain.outputs["7"]["sum"], rel=1e-3)
