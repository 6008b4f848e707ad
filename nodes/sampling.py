"""KSampler: denoise a latent with a diffusion model, guided by prompts.

The rules (which steps run for a strength or a ``denoise``, how noise is seeded)
are in ``nodes/samplers/plan.py``; the sampler and schedule names in
``nodes/samplers/names.py``.
"""
from __future__ import annotations

import dataclasses

from engine import types as T
from engine.context import NodeError
from engine.node import Batch, Input, Output, define_node
from nodes.latent import MAX_SEED, image_seeds, widen_empty
from nodes.latent_layers import fold_for_sampling
from nodes.runtime.offload import say_if_offloaded
from nodes.samplers.names import SCHEDULERS, resolve_sampler, resolve_scheduler, sampler_choices

#: Keys AddNoise puts on a LATENT; spent by the sampler, never passed on.
_NOISE_KEYS = ("noise", "strength", "seed")
#: Conditioning extras the families turn into per-conditioning rows of the network's inputs
#: (size hints, pooled text, FLUX guidance): jobs whose prompts carry only these, each job
#: its own, may share one sampler batch.
_BATCH_SAFE_EXTRAS = frozenset({"pooled_output", "width", "height", "crop_w", "crop_h", "target_width",
                                "target_height", "guidance", "aesthetic_score"})


#: The LATENT keys a batch of jobs may carry (what EmptyLatentImage, VAEEncode and AddNoise make).
_BATCH_LATENT_KEYS = frozenset({"samples", "batch_index", *_NOISE_KEYS})


def _ksampler_batch(ctx, items, model, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive=None, negative=None, denoise: float = 1.0):
    """Several jobs' KSamplers that differ only in seed, latent and prompts, as one sampler batch.

    Each job's images take their noise from their own seed (one generator per image,
    as in a single run) or from their own AddNoise, and their conditioning from their
    own prompts (the denoiser's per-job context rows, conditioning.PerJob), so each
    result equals that job's single run up to the floating-point effect of a larger
    batch on the network. ``positive``/``negative`` come per job in ``items``
    (given here only when a caller shares one prompt). Declines (None) where one
    batch would not reproduce the single runs: latents of different shapes,
    strengths, batch indices or kinds (empty vs encoded: the txt2img start
    differs), noise masks and inpainting models, conditionings other than one plain
    prompt per side (areas, masks, timestep ranges, ControlNets), prompts from text
    encoders of other widths (see _conditioning), and dpm_adaptive (its step size follows the
    error of the whole batch).
    """
    import torch

    from nodes import inpaint_sampling

    latents = [item.get("latent_image") for item in items]
    if sampler_name == "dpm_adaptive" or not all(_plain_latent(lat) for lat in latents):
        return None
    first = latents[0]
    shape, keys = first["samples"].shape, set(first)
    for lat in latents:
        if (set(lat) != keys or lat["samples"].shape != shape or lat.get("batch_index") != first.get("batch_index")
                or bool(torch.count_nonzero(lat["samples"])) != bool(torch.count_nonzero(first["samples"]))):
            return None
        if "strength" in keys and (float(lat["strength"]) != float(first["strength"])
                                   or not isinstance(lat.get("noise"), torch.Tensor) or lat["noise"].shape != shape):
            return None
    sides = _conditioning([[item.get(name, shared) for item in items]
                           for name, shared in (("positive", positive), ("negative", negative))])
    if sides is None or inpaint_sampling.in_channels(model) != shape[1]:
        return None
    combined = {"samples": torch.cat([lat["samples"] for lat in latents])}
    if "batch_index" in first:
        combined["batch_index"] = first["batch_index"]
    if "strength" in keys:
        combined.update(noise=torch.cat([lat["noise"] for lat in latents]), strength=first["strength"])
    parts = _sample(ctx, model, [int(item["seed"]) for item in items], steps, cfg, sampler_name, scheduler,
                    sides[0], sides[1], combined, denoise)
    return [({**_passed_on(lat), "samples": part},) for lat, part in zip(latents, parts)]


def _conditioning(sides: list[list]) -> list | None:
    """The batch's (positive, negative) from each job's: the shared conditioning when every job
    has the same one, else one PerJob per side (each job's own prompt for its own images);
    None when they cannot share a batch exactly.

    Each job's side must be one plain prompt whose extras are per-conditioning values the
    family turns into per-image rows (SDXL's pooled text and size ids, FLUX's pooled text
    and guidance). Prompts of different token counts (a long prompt encoded in more
    77-token windows) share the batch: the denoiser makes one network call per token
    count (nodes.families.token_groups) rather than padding or repeating contexts,
    which would change the attention's arithmetic (and for FLUX's joint attention its
    result). Encoders of other widths decline (the single runs would fail alone).
    """
    import torch

    from nodes.families.conditioning import PerJob

    for conds in sides:
        for cond in conds:
            if not isinstance(cond, (list, tuple)) or len(cond) != 1:
                return None
            embeds, extra = cond[0][0], dict(cond[0][1] or {})
            pooled = extra.get("pooled_output")
            if (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != 1
                    or not set(extra) <= _BATCH_SAFE_EXTRAS
                    or (isinstance(pooled, torch.Tensor) and pooled.shape[0] != 1)):
                return None
    if all(cond is conds[0] for conds in sides for cond in conds):
        return [conds[0] for conds in sides]  # one prompt pair for every job: the single-run path
    for conds in sides:  # the token count may differ (the denoiser groups by it), the width may not
        if len({(cond[0][0].shape[0], cond[0][0].shape[2]) for cond in conds}) != 1:
            return None
        pooled = [(cond[0][1] or {}).get("pooled_output") for cond in conds]
        if len({tuple(p.shape) if isinstance(p, torch.Tensor) else None for p in pooled}) != 1:
            return None
    return [PerJob(cond[0] for cond in conds) for conds in sides]


def _plain_latent(latent) -> bool:
    import torch

    return (isinstance(latent, dict) and isinstance(latent.get("samples"), torch.Tensor)
            and latent["samples"].ndim == 4 and set(latent) <= _BATCH_LATENT_KEYS)


def _passed_on(latent) -> dict:
    """What of the input LATENT the output keeps: everything but AddNoise's keys."""
    return {k: v for k, v in latent.items() if k not in _NOISE_KEYS} if isinstance(latent, dict) else {}


@define_node(
    "KSampler",
    category="sampling",
    inputs=[
        Input("model", T.MODEL),
        Input("seed", T.INT, default=0, min=0, max=MAX_SEED, control_after_generate=True,
              tooltip="Noise seed; image i of a batch uses seed + i"),
        Input("steps", T.INT, default=30, min=1, max=10000),
        Input("cfg", T.FLOAT, default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
              tooltip="Classifier-free guidance scale"),
        Input("sampler_name", T.COMBO, default="euler", choices=sampler_choices()),
        Input("scheduler", T.COMBO, default="normal", choices=list(SCHEDULERS)),
        Input("positive", T.CONDITIONING),
        Input("negative", T.CONDITIONING),
        Input("latent_image", T.LATENT),
        Input("denoise", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01,
              tooltip="ComfyUI's denoise, for latents that did not pass through AddNoise"),
    ],
    outputs=[Output("LATENT", T.LATENT)],
    batch=Batch(vary=("seed", "latent_image", "positive", "negative"), run=_ksampler_batch),
)
def ksampler(ctx, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
             positive, negative, latent_image, denoise: float = 1.0):
    """Denoise the latent. After AddNoise: diffusers' img2img strength rule. Otherwise
    denoise < 1 follows ComfyUI (always `steps` steps on the tail of a longer schedule)
    and denoise = 1 is text to image."""
    samples = _sample(ctx, model, [seed], steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                      denoise)[0]
    return ({**_passed_on(latent_image), "samples": samples},)


def _sample(ctx, model, job_seeds: list[int], steps: int, cfg: float, sampler_name: str, scheduler: str,
            positive, negative, latent_image, denoise: float) -> list:
    """KSampler's work for one job, or for several jobs of one batch (``latent_image`` holds
    their latents one after the other, one seed each; _ksampler_batch checked they can
    share a batch): the sampled latent of each job."""
    import torch

    from nodes.latent import seeded_noise
    from nodes import inpaint_sampling, unclip
    from nodes.samplers import loop
    from nodes.samplers.hold import Hold
    from nodes.samplers.model_sampling import for_model
    from nodes.samplers.plan import plan as make_plan

    try:
        spec = resolve_sampler(sampler_name)
    except KeyError as exc:
        raise NodeError(str(exc.args[0]), "sampler_name") from None
    try:
        schedule = resolve_scheduler(scheduler)
    except KeyError as exc:
        raise NodeError(str(exc.args[0]), "scheduler") from None
    if not isinstance(latent_image, dict) or not isinstance(latent_image.get("samples"), torch.Tensor):
        raise NodeError("expected a LATENT (a dict with 'samples')", "latent_image")
    if int(steps) < 1:
        raise NodeError(f"steps must be at least 1, got {steps}", "steps")
    # a layered latent folded to an image one, the frame count on the prompts (nodes.latent_layers)
    layers = fold_for_sampling(model, latent_image, positive, negative,
                               getattr(getattr(model, "patches", None), "perp_neg", None))
    latent, positive, negative, perp = layers.latent, layers.positive, layers.negative, layers.dual
    samples = latent["samples"].to(torch.float32)
    batch = samples.shape[0] // len(job_seeds)  # images per job
    channels = getattr(model, "latent_channels", samples.shape[1])
    if latent.get("strength") is None:  # ComfyUI's rule, as SamplerCustomAdvanced's
        samples = widen_empty(samples, channels, getattr(getattr(model, "latent", None), "downscale", 8))
    if samples.shape[1] != channels:
        raise NodeError(f"the latent has {samples.shape[1]} channels but this {model.family.name} model works on "
                        f"{channels}-channel latents (use its VAE, or EmptySD3LatentImage for 16 channels)",
                        "latent_image")

    # One generator per image: its first draw is that image's starting noise, later
    # draws feed ancestral/SDE steps (diffusers' pipelines draw in the same order).
    seeds = [s for seed in job_seeds for s in image_seeds(seed, batch, latent.get("batch_index"))]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn((1, *samples.shape[1:]), generator=g) for g in generators])

    strength = latent.get("strength")
    if strength is not None:
        strength = float(strength)
        if not 0.0 <= strength <= 1.0:
            raise NodeError(f"the latent's strength must be within 0..1, got {strength}", "latent_image")
        given = latent.get("noise")
        if not isinstance(given, torch.Tensor) or given.shape != samples.shape:
            raise NodeError("the latent has a strength but no noise of its shape (re-run AddNoise)", "latent_image")
        noise = given.to(torch.float32)
        if float(denoise) < 1.0:
            ctx.message("denoise is ignored: AddNoise's strength sets where sampling starts")
    for note in model.family.conditioning_notes([positive, negative]):
        ctx.message(note)
    if samples.shape[1] != model.latent.channels:
        raise NodeError(f"the latent has {samples.shape[1]} channels but the model's latent space has "
                        f"{model.latent.channels}", "latent_image")
    # ComfyUI's rule, as SamplerCustom's: an empty latent is not shifted into model space (it stays
    # zero), which matters where the latent map has an offset (FLUX's shift, Playground's means).
    x0 = model.latent.to_model(samples) if bool(torch.count_nonzero(samples)) else samples
    # perp: the PerpNeg patch's empty prompt, prepared with the others
    positive, negative, perp = unclip.for_sampling(model, positive, negative, job_seeds, perp)
    prep = inpaint_sampling.prepare(model, positive, negative, latent, x0, ctx.message,
                                    middle=None if perp is None else perp.middle,
                                    middle_name="model" if perp is None else perp.middle_input)
    if prep.nothing_to_repaint:
        return list(latent_image["samples"].split(batch))
    try:
        p = make_plan(spec, schedule, layers.sampling_config(model.scheduler_config), int(steps), x0=x0,
                      noise=noise, strength=strength, denoise=float(denoise))
    except loop.ConditioningError as exc:  # e.g. a sampler the model's sampling (flow) lacks
        raise NodeError(str(exc), exc.input_name) from None
    if p.start is None:  # strength 0 / denoise 0: nothing to denoise
        return list(latent_image["samples"].split(batch))
    if hasattr(p.scheduler, "noise_sampler_seed"):  # DPM++ SDE: one Brownian tree per image
        p.scheduler.noise_sampler_seed = [s % (2 ** 63) for s in seeds]

    image_size = (samples.shape[2] * 8, samples.shape[3] * 8)
    note = getattr(model, "compile_note", lambda: None)()
    if note:
        ctx.message(note)
    hold = None if prep.mask is None else Hold(x0, noise, prep.mask, for_model(model),
                                                 strength=model.patches.differential_diffusion)
    try:
        with model.unet() as unet:
            say_if_offloaded(unet, ctx.message)
            result = loop.run(unet, p, positive=prep.positive, negative=prep.negative, cfg=float(cfg),
                              generators=generators, family=model.family, latent=model.latent,
                              training_config=model.scheduler_config, image_size=image_size,
                              progress=ctx.progress, check_interrupted=ctx.check_interrupted,
                              previews=ctx.wants_previews, say=ctx.message, hold=hold, jobs=len(job_seeds),
                              patches=model.patches,
                              dual=None if perp is None else dataclasses.replace(perp, middle=prep.middle))
    except loop.ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    final = model.latent.from_model(result).to("cpu", torch.float32)
    if hold is not None:
        final = hold.finish(samples, final)
    return list(layers.unfold(final).split(batch))
