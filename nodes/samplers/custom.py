"""Sampling over a given sigma list: what SamplerCustomAdvanced, SamplerCustom and
KSamplerAdvanced share.

The values on ComfyUI's custom-sampling sockets are small records: :class:`Noise`
(NOISE), :class:`Guider` (GUIDER), a :class:`~nodes.samplers.names.SamplerSpec`
(SAMPLER) and a 1-D float32 tensor (SIGMAS). :func:`sample` turns them into one run
of the sampling loop; the model's sampling object (``model_sampling.for_model``)
decides how noise is applied and what steps over the sigmas, so nothing here knows
a model family.

Noise follows KSampler's rule (plan.py): image i of a batch draws from a CPU
generator seeded ``seed + i`` (or ``seed + batch_index[i]``); that generator then
feeds the ancestral/SDE steps. DisableNoise starts from the latent as it is and,
as in ComfyUI, seeds the sampler's own noise with 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.context import NodeError
from nodes.runtime.offload import say_if_offloaded

if TYPE_CHECKING:
    import torch

#: Keys AddNoise puts on a LATENT; spent by a sampler, never passed on.
NOISE_KEYS = ("noise", "strength", "seed")


@dataclass(frozen=True)
class Noise:
    """NOISE: where the starting noise comes from (``enabled`` False: none is added).

    ``variation_strength`` > 0 (VariationNoise): each image's noise is turned towards the
    noise of ``variation_seed`` (+ i) along the great circle between the two, as A1111's
    variation seeds do, so a small strength gives a close variation of the same picture and
    1 the other seed's picture. The sampler's later noise still comes from ``seed``."""

    seed: int
    enabled: bool = True
    variation_seed: int = 0
    variation_strength: float = 0.0

    def draw(self, samples: "torch.Tensor", batch_index: Any = None) -> tuple["torch.Tensor", list]:
        """(starting noise like ``samples``, one generator per image positioned after that draw)."""
        import torch

        from nodes.latent import image_seeds

        seeds = image_seeds(self.seed, samples.shape[0], batch_index)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        if not self.enabled:
            return torch.zeros_like(samples, dtype=torch.float32), generators
        noise = torch.cat([torch.randn((1, *samples.shape[1:]), generator=g) for g in generators])
        if self.variation_strength > 0:
            other = Noise(self.variation_seed).draw(samples, batch_index)[0]
            noise = torch.cat([slerp(a, b, self.variation_strength) for a, b in zip(noise, other)])
        return noise, generators


def slerp(a: "torch.Tensor", b: "torch.Tensor", t: float) -> "torch.Tensor":
    """The point a fraction ``t`` of the way from ``a`` to ``b`` along the great circle through
    them (as one vector each), with the norm going linearly from |a| to |b|: Gaussian noise
    stays Gaussian-sized all the way, where a straight blend would shrink it (to 0.71 of its
    size halfway between two independent draws). Returned with a batch axis of 1."""
    import torch

    flat_a, flat_b = a.reshape(-1).double(), b.reshape(-1).double()
    norm_a, norm_b = flat_a.norm(), flat_b.norm()
    cos = torch.clamp(torch.dot(flat_a, flat_b) / (norm_a * norm_b), -1.0, 1.0)
    omega = torch.arccos(cos)
    if float(torch.sin(omega)) < 1e-6:  # (anti)parallel: the circle is not defined, blend instead
        mixed = (1 - t) * flat_a + t * flat_b
    else:
        unit = (torch.sin((1 - t) * omega) * flat_a / norm_a + torch.sin(t * omega) * flat_b / norm_b) / torch.sin(omega)
        mixed = unit * ((1 - t) * norm_a + t * norm_b)
    return mixed.reshape(1, *a.shape).to(a.dtype)


@dataclass(frozen=True, eq=False)
class Guider:
    """GUIDER: a model with its conditioning and guidance scale (cfg 1: positive only).
    ``dual`` (DualCFGGuider): a second prompt and its scale against the negative
    (nodes.families.dual_cfg.DualCFG); positive and cfg are then its cond1 and cfg_conds.
    PerpNegGuider rides on the same slot with its empty prompt (nodes.families.perp_neg.PerpNeg):
    anything with a ``middle`` conditioning and a ``denoiser`` factory fits."""

    model: Any
    positive: Any
    negative: Any
    cfg: float
    dual: Any = None

    def __kiln_nbytes__(self) -> int:
        return 0  # conditioning tensors are counted where they were made


def check_sigmas(sigmas: Any, input_name: str = "sigmas") -> "torch.Tensor":
    """A SIGMAS value as a 1-D float32 CPU tensor; a NodeError naming ``input_name`` otherwise."""
    import torch

    if not isinstance(sigmas, torch.Tensor):
        raise NodeError(f"expected SIGMAS (a 1-D tensor of noise levels), got {type(sigmas).__name__}", input_name)
    if sigmas.ndim != 1:
        raise NodeError(f"SIGMAS must be a 1-D list of noise levels, got shape {tuple(sigmas.shape)}", input_name)
    sigmas = sigmas.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise NodeError("SIGMAS must be finite and not negative", input_name)
    return sigmas


def check_latent(latent: Any, input_name: str = "latent_image") -> "torch.Tensor":
    """A LATENT's samples as float32: an image latent [B, C, h, w] or a layered one [B, C, frames, h, w]
    (which of the two the model takes is :func:`nodes.latent_layers.fold_for_sampling`'s check)."""
    import torch

    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise NodeError("expected a LATENT (a dict with 'samples')", input_name)
    samples = latent["samples"]
    if samples.ndim not in (4, 5):
        raise NodeError(f"latent samples must be [B, C, h, w] (or a layered [B, C, frames, h, w]), got shape "
                        f"{tuple(samples.shape)}", input_name)
    return samples.to(torch.float32)


def sample(ctx: Any, guider: Guider, spec: Any, sigmas: "torch.Tensor", latent: dict, noise: Noise, *,
           sigmas_input: str = "sigmas", latent_input: str = "latent_image",
           sampler_input: str = "sampler", model_input: str = "model") -> tuple[dict, dict]:
    """Denoise ``latent`` over ``sigmas``; returns (output, denoised_output) LATENTs. The ``*_input`` names
    are the calling node's inputs that errors name (SamplerCustomAdvanced's model comes on ``guider``).

    ``output`` is the state at the last sigma (with leftover noise when that is not 0);
    ``denoised_output`` the model's clean-latent prediction at the last step.
    """
    import contextlib
    import dataclasses

    import torch

    from nodes import inpaint_sampling
    from nodes.latent import widen_empty
    from nodes.latent_layers import fold_for_sampling
    from nodes.samplers import loop
    from nodes.samplers.hold import Hold
    from nodes.samplers.model_sampling import for_model
    from nodes.samplers.plan import Plan

    model = guider.model
    sigmas = check_sigmas(sigmas, sigmas_input)
    if len(sigmas) < 2:
        raise NodeError(f"SIGMAS has {len(sigmas)} value(s): sampling needs at least 2 (a start and an end); "
                        "check the scheduler's steps and denoise or where SplitSigmas splits", sigmas_input)
    check_latent(latent, latent_input)
    # a layered latent folded to an image one, the frame count on the prompts (nodes.latent_layers)
    given = latent
    layers = fold_for_sampling(model, latent, guider.positive, guider.negative,
                               guider.dual if guider.dual is not None else model.patches.perp_neg, latent_input)
    latent = layers.latent
    samples = latent["samples"].to(torch.float32)
    channels = model.latent.channels
    # ComfyUI's rule: an empty latent takes the model's channels (and its pixels per cell)
    samples = widen_empty(samples, channels, model.latent.downscale)
    if channels and samples.shape[1] != channels:
        raise NodeError(f"the latent has {samples.shape[1]} channels but this model works on "
                        f"{model.latent.channels}", latent_input)
    if latent.get("strength") is not None:
        ctx.message("the latent's AddNoise strength is ignored here: the sigmas set where sampling starts")
    sampling = for_model(model)
    start_noise, generators = noise.draw(samples, latent.get("batch_index"))
    # ComfyUI's rule: an empty latent is not shifted into model space (it stays zero).
    x0 = model.latent.to_model(samples) if bool(torch.count_nonzero(samples)) else samples
    for note in sampling.notes(layers.frame_height(samples), samples.shape[3]):  # a layered latent: one frame
        ctx.message(note)
    # A noise mask and an inpainting model's extra channels: KSampler's preparation, shared.
    from nodes import unclip

    positive, negative, dual = unclip.for_sampling(model, layers.positive, layers.negative, [int(noise.seed)],
                                                   layers.dual)
    prep = inpaint_sampling.prepare(model, positive, negative, latent, x0, ctx.message,
                                    middle=None if dual is None else dual.middle,
                                    middle_name=getattr(dual, "middle_input", "cond2"))
    if dual is not None:  # the second prompt with the inpainting channels the others got
        dual = dataclasses.replace(dual, middle=prep.middle)
    if prep.nothing_to_repaint:
        out = {k: v for k, v in given.items() if k not in NOISE_KEYS}
        return out, out
    try:
        sched, timesteps = sampling.stepper(spec, sigmas)
    except loop.ConditioningError as exc:  # a sampler this model's sampling (flow) lacks
        raise NodeError(str(exc), sampler_input if exc.input_name == "sampler" else exc.input_name) from None
    except ValueError as exc:
        raise NodeError(str(exc), sigmas_input) from None
    sigma0 = float(sigmas[0])
    # DisableNoise: the latent is the state at sigma0 already (e.g. the low half of a split run).
    # A flow model's blend would scale it by 1 - sigma0 (ComfyUI does; custom nodes work around it).
    begin = sampling.start(sigma0, start_noise, x0) if noise.enabled else x0
    start = sampling.to_state(sched, begin, sigma0)
    if hasattr(sched, "noise_sampler_seed"):  # DPM++ SDE: one Brownian tree per image
        from nodes.latent import image_seeds

        seeds = image_seeds(noise.seed, samples.shape[0], latent.get("batch_index"))
        sched.noise_sampler_seed = [s % (2 ** 63) for s in seeds]
    if prep.mask is not None and getattr(sched, "resizes", False):
        raise NodeError("this sampler grows the latent while it samples (SamplerLCMUpscale), which a noise mask "
                        "cannot follow: drop the mask or the upscale", sampler_input)
    plan = Plan("custom", sched, timesteps, start, sigmas)
    hold = None if prep.mask is None else Hold(x0, start_noise, prep.mask, sampling,
                                                 strength=model.patches.differential_diffusion,
                                                 end_sigma=float(sigmas[-1]))
    image_size = (samples.shape[2] * 8, samples.shape[3] * 8)
    denoised: list = []
    try:
        opened = getattr(dual, "opened", None)  # a guider with a second model (DualModelGuider) holds it too
        with model.unet() as unet, (contextlib.nullcontext(dual) if opened is None else
                                        opened(guider.cfg != 1.0 or bool(model.patches.cfg_overrides), model, unet)) as dual:
            say_if_offloaded(unet, ctx.message)
            result = loop.run(unet, plan, positive=prep.positive, negative=prep.negative, cfg=guider.cfg,
                              generators=generators, family=model.family, latent=model.latent,
                              training_config=model.scheduler_config, image_size=image_size,
                              progress=ctx.progress, check_interrupted=ctx.check_interrupted, denoised=denoised,
                              previews=ctx.wants_previews, say=ctx.message, hold=hold, patches=model.patches, dual=dual)
    except loop.ConditioningError as exc:  # the model's patches, or the model diverging (loop.Diverged)
        raise NodeError(str(exc), model_input if exc.input_name == "model" else exc.input_name) from None
    result = sampling.from_state(sched, result, float(sigmas[-1]))
    out = {k: v for k, v in given.items() if k not in NOISE_KEYS}
    final = model.latent.from_model(result).to("cpu", torch.float32)
    if hold is not None and float(sigmas[-1]) == 0.0:
        # Kept pixels are the input's exactly once the run is done; a run that stops early
        # (leftover noise for a second sampler) hands on its held, noised state as it is.
        final = hold.finish(samples, final)
    out["samples"] = layers.unfold(final)
    if not denoised:
        return out, out
    clean = dict(out)
    clean["samples"] = layers.unfold(model.latent.from_model(denoised[0].to(torch.float32)).to("cpu", torch.float32))
    return out, clean
