"""Samplers beyond euler on FLUX: Kiln's KSampler against diffusers' FluxPipeline running the same scheduler.

FluxPipeline asks its scheduler for FluxPipeline's grid (``linspace(1, 1/N, N)``
shifted by ``mu``), which diffusers' flow Heun and DPM-Solver classes cannot take
(their ``set_timesteps`` builds its own grid). Each is therefore given, here, a
``set_timesteps`` that lays FluxPipeline's grid (made by the pipeline's own Euler
scheduler) out as the class's own ``set_timesteps`` lays out its grid (checked
against the class on its own grid in the first test); stepping is the class's.
The RF ancestral Euler, which diffusers lacks, is written out below as a
scheduler the pipeline runs. The decoded images must agree within 1/255.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tiny_flux
from test_flux import PIXEL_TOL, Recorder, _decode, _embeds, _init_raw, _model
from nodes.samplers import flow
from nodes.samplers.names import resolve_sampler
from nodes.sampling import ksampler

STEPS, SEED = 4, 5


def _euler_grid(sigmas=None, mu=None):
    """FluxPipeline's grid, made by the pipeline's own flow Euler scheduler (ends with 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    euler = FlowMatchEulerDiscreteScheduler.from_config(tiny_flux.components("dev")["scheduler"].config)
    euler.set_timesteps(sigmas=sigmas, mu=mu)
    return euler.sigmas


def _heun(grid):
    """FlowMatchHeunDiscreteScheduler over ``grid`` (ending in 0), laid out as its set_timesteps does."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    sched = FlowMatchHeunDiscreteScheduler(shift=1.0)
    sched.set_timesteps(len(grid) - 1)
    inner = grid[:-1]
    sched.timesteps = torch.cat([inner[:1], inner[1:].repeat_interleave(2)]) * 1000
    sched.sigmas = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
    return sched


def _dpmpp_2m(grid):
    """DPMSolverMultistepScheduler (flow sigmas, 2M, midpoint) over ``grid``, laid out as its set_timesteps does."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
                                        algorithm_type="dpmsolver++", solver_type="midpoint", flow_shift=1.0,
                                        final_sigmas_type="zero", use_dynamic_shifting=True)
    sched.set_timesteps(len(grid) - 1)
    sched.sigmas = grid.clone()
    sched.timesteps = grid[:-1] * 1000
    return sched


class RFEulerAncestral:
    """ComfyUI's ``sample_euler_ancestral_RF`` (eta 1) written out as a FluxPipeline scheduler.

    The pipeline's latents are packed 2x2 patches; fresh noise is drawn unpacked
    (the order the generator fills a [1, 16, h, w] latent) and packed, as Kiln's is.
    """

    order = 1

    def __init__(self, pipe, generator, h: int, w: int) -> None:
        self.config, self.pipe, self.generator, self.h, self.w = pipe.scheduler.config, pipe, generator, h, w

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        self.sigmas = _euler_grid(sigmas=sigmas, mu=mu)
        self.timesteps = self.sigmas[:-1] * 1000
        self.i = 0

    def set_begin_index(self, index=0):
        self.i = index

    def step(self, v, t, x, return_dict=False):
        s, s_next = float(self.sigmas[self.i]), float(self.sigmas[self.i + 1])
        self.i += 1
        x0 = x - s * v
        if s_next == 0:
            return (x0,)
        s_down = s_next * (1 + (s_next / s - 1))  # eta = 1
        alpha_next, alpha_down = 1 - s_next, 1 - s_down
        renoise = math.sqrt(s_next ** 2 - s_down ** 2 * alpha_next ** 2 / alpha_down ** 2)
        x = (s_down / s) * x + (1 - s_down / s) * x0
        noise = torch.randn(1, 16, self.h, self.w, generator=self.generator)
        noise = self.pipe._pack_latents(noise, 1, 16, self.h, self.w)
        return ((alpha_next / alpha_down) * x + noise * renoise,)


def test_the_grid_is_laid_out_as_the_diffusers_class_lays_out_its_own():
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler

    cfg = _model("dev").scheduler_config
    own = FlowMatchHeunDiscreteScheduler(shift=3.0)
    own.set_timesteps(5)
    grid = torch.cat([own.sigmas[:1], own.sigmas[1:-1:2], own.sigmas[-1:]])
    ours = flow.on_grid(resolve_sampler("heun"), cfg, grid)
    assert torch.equal(ours.sched.sigmas, own.sigmas) and torch.allclose(ours.timesteps, own.timesteps)
    own = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    own.set_timesteps(5)
    ours = flow.on_grid(resolve_sampler("dpmpp_2m"), cfg, own.sigmas)
    assert torch.equal(ours.sched.sigmas, own.sigmas)
    assert torch.equal(ours.timesteps.long(), own.timesteps)  # diffusers rounds its timesteps down to integers
    assert len(_heun(own.sigmas).timesteps) == 2 * 5 - 1  # the test's layout: the last step to 0 is one Euler step


def _kiln(sampler: str, seed: int = SEED) -> torch.Tensor:
    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    rec = Recorder()
    (out,) = ksampler(rec.ctx, _model("dev"), seed, STEPS, 1.0, sampler, "normal", cond, cond,
                      {"samples": torch.zeros(1, 16, 8, 8)})
    return _decode("dev", out["samples"])


def _diffusers(sampler: str) -> torch.Tensor:
    pipe = tiny_flux.pipeline("dev")
    generator = torch.Generator().manual_seed(SEED)
    if sampler == "euler_ancestral":
        pipe.scheduler = RFEulerAncestral(pipe, generator, 8, 8)
    else:
        make = _heun if sampler == "heun" else _dpmpp_2m
        sched = make(_euler_grid(np.linspace(1.0, 1 / STEPS, STEPS), mu=1.0))  # replaced below

        def set_timesteps(num_inference_steps=None, device=None, sigmas=None, mu=None):
            if sigmas is None:  # FluxPipeline passes DPM-Solver (use_flow_sigmas) none: the grid is still its own
                sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            fresh = make(_euler_grid(sigmas, mu))
            sched.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "set_timesteps"})

        sched.set_timesteps = set_timesteps
        pipe.scheduler = sched
    embeds, pooled = _embeds("dev")
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=STEPS,
                   guidance_scale=3.5, generator=generator, output_type="pt").images
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral"])
def test_flow_sampler_equals_diffusers_on_flux_pipeline(sampler):
    ours = _kiln(sampler)
    assert (ours - _diffusers(sampler)).abs().max() <= PIXEL_TOL
    assert (ours - _kiln("euler")).abs().max() > 0.002  # another sampler: not euler under another name
    if sampler == "euler_ancestral":  # the fresh noise is seeded: another seed, another image
        assert (ours - _kiln(sampler, seed=SEED + 1)).abs().max() > 0.02


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_custom_sampling_with_a_flow_sampler_equals_ksampler(sampler):
    from test_flux import _fixed, custom_advanced

    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    model, latent = _fixed(_model("dev")), {"samples": _init_raw()}
    (ref,) = ksampler(Recorder().ctx, model, 9, 4, 1.0, sampler, "simple", cond, cond, latent, denoise=0.6)
    _, out = custom_advanced(model, cond, None, 1.0, latent, seed=9, steps=4, denoise=0.6, sampler=sampler,
                             scheduler="simple")
    assert (_decode("dev", out["samples"]) - _decode("dev", ref["samples"])).abs().max() <= PIXEL_TOL


def test_flow_runs_use_the_flow_training_schedule_and_log_no_scheduler_warning():
    """The loop used to build SD's 1000-step schedule from the flow config, and diffusers logged
    ``kiln_shift_seq_len ... not expected`` on every run with ModelSamplingFlux."""
    import logging

    from test_flux import _fixed

    from nodes.families import flux
    from nodes.families.denoiser import Denoiser
    from nodes.samplers.schedules import training_schedule

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever another test set: the warning must be emitted if it happens
    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    model = _fixed(_model("dev"))
    try:
        ksampler(Recorder().ctx, model, 1, 2, 1.0, "euler", "normal", cond, cond, {"samples": torch.zeros(1, 16, 8, 8)})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert flow.SHIFT_SEQ_LEN in model.scheduler_config
    assert not [r.getMessage() for r in records if "not expected" in r.getMessage()]
    schedule = training_schedule(model.scheduler_config)
    assert isinstance(schedule, flow.FlowSchedule)
    denoiser = Denoiser(tiny_flux.components("dev")["transformer"], flux.FAMILY, positive=cond, negative=cond, cfg=1.0,
                        image_size=(64, 64), batch=1, schedule=schedule)
    # ComfyUI's flow rule: the flow time 1 - percent, shifted at the mu ModelSamplingFlux fixed
    mu = flow.calculate_mu(model.scheduler_config, int(model.scheduler_config[flow.SHIFT_SEQ_LEN]))
    assert denoiser.sigma_at_percent(0.3) == pytest.approx(math.exp(mu) / (math.exp(mu) + (1 / 0.7 - 1)))
    assert denoiser.sigma_at_percent(0.3) > 0.7  # shifted towards noise, as the grid is
    assert float(schedule.sigma(schedule.timestep(0.25))) == pytest.approx(0.25)
