"""Where sampling starts and which noise levels it visits: the strength/denoise rules.

KSampler serves three kinds of input, told apart by the LATENT it receives:

1. **Image to image through AddNoise** (the LATENT carries ``"strength"``): the rule
   of diffusers' ``StableDiffusionImg2ImgPipeline`` and A1111. With ``steps`` = N and
   strength s, the N-step schedule is built and its last ``int(N * s)`` steps run,
   starting from the clean latent noised to the level of the first step run.
   s = 0 runs nothing and returns the input latent (so the image is its VAE round
   trip); s = 1 starts from (almost) pure noise.
   Mapping from Stability's API: ``start_schedule`` (``step_schedule_start``) is
   ``1 - image_strength`` and is this strength: ``strength = start_schedule =
   1 - image_strength``. A Stability request with ``image_strength=0.35, steps=50``
   is ``strength=0.65, steps=50`` here and runs int(50 * 0.65) = 32 denoising steps.
2. **ComfyUI's ``denoise``** (no strength, ``denoise`` < 1): ComfyUI's rule, so an
   existing ComfyUI workflow gives ComfyUI's schedule: always exactly ``steps`` steps,
   on the tail of the ``int(steps / denoise)``-step schedule (steps=20,
   denoise=0.5 runs the last 20 of 40). The starting noise is drawn from the seed
   the way ComfyUI draws it (CPU generator).
3. **Text to image** (no strength, ``denoise`` = 1, typically EmptyLatentImage):
   the full schedule from noise, as diffusers' ``StableDiffusionPipeline`` does it.

Noise: image i of a batch uses a CPU ``torch.Generator`` seeded ``seed + i`` (or
``seed + batch_index[i]``). Its first draw is the image's starting noise; the
ancestral and SDE samplers continue drawing from it. That is the order diffusers'
pipelines draw in, which is what lets Kiln's output equal theirs, and it makes
each image of a batch the same as a single run with its own seed, on any device.
(ComfyUI draws a whole batch from one generator; for batch size 1 the two agree.)
One exception to "any device": ``dpmpp_sde`` takes its noise from a Brownian tree
(torchsde) seeded ``seed + i`` per image, which draws on the latent's device, so it
is reproducible per device but not across CPU and GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from nodes.samplers import schedules, steppers
from nodes.samplers.names import SamplerSpec

if TYPE_CHECKING:
    import torch

MODE_IMG2IMG = "img2img"
MODE_COMFY = "comfy_denoise"
MODE_TXT2IMG = "txt2img"


@dataclass
class Plan:
    mode: str
    scheduler: Any
    timesteps: "torch.Tensor"
    #: The starting latent in the scheduler's space (model-scaled), or None: nothing to run.
    start: "torch.Tensor | None"
    #: The sigma list the sampler follows, when known (for reporting and tests).
    sigmas: "torch.Tensor | None" = None


def init_noise_sigma(config: Mapping[str, Any], sigma0: float) -> float:
    # diffusers' k-schedulers: sigma_max for linspace/trailing grids, else sqrt(sigma_max^2 + 1).
    if config.get("timestep_spacing", "leading") in ("linspace", "trailing"):
        return sigma0
    return math.sqrt(sigma0 ** 2 + 1)


def plan(spec: SamplerSpec, schedule: str, config: Mapping[str, Any], steps: int, *,
         x0: "torch.Tensor", noise: "torch.Tensor", strength: float | None, denoise: float,
         discard_penultimate: bool | None = None) -> Plan:
    """Build the scheduler and the starting latent for one KSampler run.

    ``x0`` is the clean latent already multiplied by the model's latent scale;
    ``noise`` is the per-image starting noise (same shape).
    """
    import torch

    from nodes.samplers import edm, flow

    if flow.is_flow(config):  # the model's own sampling (x_t = (1 - t) x0 + t noise): see flow.py
        return flow.plan(spec, schedule, config, steps, x0=x0, noise=noise, strength=strength, denoise=denoise)
    if edm.is_edm(config):  # continuous time: no DDPM timesteps, Kiln's steppers (edm.py)
        return edm.plan(spec, schedule, config, steps, x0=x0, noise=noise, strength=strength, denoise=denoise)
    empty = not bool(torch.count_nonzero(x0))
    if strength is not None:
        first, run = schedules.strength_steps(steps, strength)
        if run == 0:
            return Plan(MODE_IMG2IMG, None, torch.zeros(0), None)
        if steppers.has_native(spec, schedule):
            sched = steppers.native(spec, config, schedule, steps)
            begin = first * sched.order
            timesteps = sched.timesteps[begin:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(begin)
            start = sched.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
            return Plan(MODE_IMG2IMG, sched, timesteps, start, getattr(sched, "sigmas", None))
        sigmas = schedules.diffusers_sigmas(config, schedule, steps)[first:]
        sched = steppers.on_sigmas(spec, config, sigmas)
        start = steppers.to_state(sched, x0 + noise * float(sigmas[0]), float(sigmas[0]))
        return Plan(MODE_IMG2IMG, sched, sched.timesteps, start, sigmas)

    if denoise < 0.9999:
        ts = schedules.TrainingSchedule(config)
        discard = spec.discard_penultimate_sigma if discard_penultimate is None else discard_penultimate
        sigmas = schedules.comfy_sigmas(ts, schedule, steps, denoise, discard)
        if len(sigmas) < 2:
            return Plan(MODE_COMFY, None, torch.zeros(0), None, sigmas)
        sched = steppers.on_sigmas(spec, config, sigmas)
        sigma0 = float(sigmas[0])
        full = math.isclose(ts.sigma_max, sigma0, rel_tol=1e-5) or sigma0 > ts.sigma_max
        scale = math.sqrt(1 + sigma0 ** 2) if full else sigma0
        return Plan(MODE_COMFY, sched, sched.timesteps, steppers.to_state(sched, x0 + noise * scale, sigma0), sigmas)

    # Text to image: the whole schedule from noise. A non-empty latent here (an encoded
    # image with neither AddNoise nor denoise < 1) is image to image at strength 1.
    if steppers.has_native(spec, schedule):
        sched = steppers.native(spec, config, schedule, steps)
        if empty:
            start = noise * sched.init_noise_sigma
        else:
            start = sched.add_noise(x0, noise, sched.timesteps[:1].repeat(x0.shape[0]))
        return Plan(MODE_TXT2IMG, sched, sched.timesteps, start, getattr(sched, "sigmas", None))
    sigmas = schedules.diffusers_sigmas(config, schedule, steps)
    sched = steppers.on_sigmas(spec, config, sigmas)
    sigma0 = float(sigmas[0])
    start = noise * init_noise_sigma(config, sigma0) if empty else x0 + noise * sigma0
    return Plan(MODE_TXT2IMG, sched, sched.timesteps, steppers.to_state(sched, start, sigma0), sigmas)
