"""The denoiser: one network evaluation with classifier-free guidance, for any family.

The sampling loop hands it the scheduler's model input and timestep and gets back
the guided network output in the model's prediction space (epsilon, v or flow),
which is what diffusers' schedulers step with. How the network is called (time
ids, pooled embeddings, extra input channels) is the family's business
(:meth:`Family.network_kwargs`, :meth:`Family.extra_channels`); how several
conditionings combine (ComfyUI's areas, masks, strengths and timestep ranges) is
:mod:`nodes.families.conditioning`'s. :meth:`Denoiser.predict` gives the clean-image
prediction ``denoised`` for samplers that work in that form.

Guidance runs the unconditional and conditional passes as ONE batch of 2B
([negatives..., positives...], diffusers' order) whenever each side is a single
plain conditioning, halving the number of network calls and keeping diffusers'
exact arithmetic.

A side given as :class:`~nodes.families.conditioning.PerJob` (a cross-job batch
of queued jobs with their own prompts) holds one plain entry per job; each job's
share of the batch gets its own context rows and its own family extras, in the
same [negatives..., positives...] layout, so each image sees exactly the
conditioning of its single run. Jobs whose prompts have other token counts (a
long prompt encoded in several 77-token windows) are evaluated in one network
call per token count (:mod:`nodes.families.token_groups`), each call with exactly
its rows' own contexts.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from nodes.families import conditioning as cond_rules
from nodes.families import token_groups
from nodes.families.base import ConditioningError, Family

if TYPE_CHECKING:
    import torch


class Denoiser:
    def __init__(self, network: Any, family: Family, *, positive: Any, negative: Any, cfg: float,
                 image_size: tuple[int, int], batch: int, schedule: Any = None,
                 prediction_type: str = "epsilon", cfg_rescale: float = 0.0, pag_scale: float = 0.0,
                 names: tuple[str, str] = ("positive", "negative"), guidance: tuple = (),
                 always_guided: bool = False, self_attention: Any = None, skip_layers: Any = None,
                 control: Any = None, sample_sigmas: Any = None) -> None:
        """``schedule``: the model's training schedule (nodes.samplers.schedules.TrainingSchedule),
        which turns timesteps into noise levels for conditionings with timestep ranges;
        ``prediction_type``: what the network predicts (for pixels no conditioning covers);
        ``cfg_rescale``: RescaleCFG's multiplier (:func:`rescale_guidance`); ``pag_scale``:
        perturbed-attention guidance's scale (nodes.families.perturbed); ``names``: the node
        inputs the two sides came from, which errors name (a guider composing several
        denoisers, nodes.families.dual_cfg, passes its own); ``guidance``: the model's guidance
        rules (nodes.families.guidance_rules), run with fresh state for this denoiser's run;
        ``always_guided``: evaluate the negative even at cfg 1 (a guider whose rule needs it);
        ``self_attention``: SelfAttentionGuidance's settings (nodes.families.self_attention), which
        read the unconditional side at cfg 1 too, as ComfyUI's does; ``skip_layers``: skip-layer
        guidance's settings (nodes.families.skip_layers); ``control``: the model's own ControlNet chain
        (SamplingPatches.model_control), stacked on every conditioning's (nodes.control.apply.with_model_control);
        ``sample_sigmas``: the noise levels the sampler visits (the plan's, its end included), from which a
        network that reads its step's end (``reads_next_sigma``) is given it (:meth:`next_sigma`)."""
        from nodes.runtime.offload import compute_device

        #: Jobs sharing this batch, each with its own prompt (PerJob sides); 1 otherwise.
        self.jobs = len(positive) if isinstance(positive, cond_rules.PerJob) else 1
        network = family.wrap_network(network)
        self.network, self.family = network, family
        # where it computes, not where its weights are: offloaded ones rest off the device
        self.device, self.dtype = compute_device(network), network.dtype
        self.cfg = float(cfg)
        self.self_attention = self_attention if self_attention is not None and self_attention.scale and \
            self_attention.blur_sigma else None
        self.guided = self.cfg != 1.0 or always_guided or self.self_attention is not None
        #: The raw negative, and the single-side denoisers the extra guidance passes run (_side).
        self._negative, self._sides_alone = negative, {}
        #: EasyCache's run (nodes.families.step_cache.EasyCacheRun), set by the loop; None: every call runs.
        self.network_cache: Any = None
        self.skip_layers = skip_layers
        self.cfg_rescale = float(cfg_rescale)
        self.pag_scale = float(pag_scale)
        from nodes.families.guidance_rules import GuidanceRun

        #: ComfyUI's CFG-changing patches (CFGZeroStar, APG, ...), None when there are none.
        self._rules = GuidanceRun(guidance, self.jobs) if guidance else None
        self._args = dict(network=getattr(network, "kiln_network", network), family=family, positive=positive,
                          image_size=image_size, batch=batch, schedule=schedule, prediction_type=prediction_type,
                          names=names, control=control, sample_sigmas=sample_sigmas)
        self.image_size, self.batch = image_size, batch
        self.positive = cond_rules.entries(positive, names[0])
        self.negative = cond_rules.entries(negative, names[1]) if self.guided else []
        _check_width(network, family, self.positive + self.negative)
        _check_references(family, self.positive + self.negative)
        from nodes.control.apply import share_with_uncond, with_model_control

        share_with_uncond(self.positive, self.negative)
        with_model_control(self.positive + self.negative, control)
        self.schedule = schedule
        self.sample_sigmas = sample_sigmas
        #: Whether each network call is given its step's end, ``sigma_next`` (a MeanFlow network's).
        self._reads_next = bool(getattr(network, "reads_next_sigma", False))
        #: The network output -> velocity conversion of the model's sampling rule (flow models), or None.
        self._from_network = getattr(schedule, "from_network", None)
        # a flow model's scheduler config names no prediction type; its schedule says it predicts velocity
        self.prediction_type = getattr(schedule, "prediction_type", None) or prediction_type
        #: The data spread of the network's preconditioning (a continuous-EDM model's; 1 otherwise).
        self.sigma_data = float(getattr(schedule, "sigma_data", 1.0))
        #: ((h, w), (positive, negative)) resolved for that latent size (the general path)
        self._sides: Any = None
        #: The last call's unguided (negative-side) output, for CFG++ samplers; the output
        #: itself when there is no guidance.
        self.last_uncond: "torch.Tensor | None" = None
        #: The last call's conditional (positive-side) output, before RescaleCFG and PAG: what
        #: dual CFG's regular style measures the first prompt's push from.
        self.last_cond: "torch.Tensor | None" = None
        self._plain = _plain(self.positive, self.jobs) and (not self.guided or _plain(self.negative, self.jobs))
        if self.jobs > 1 and (not self._plain or batch % self.jobs):
            raise ConditioningError("a cross-job batch needs one plain conditioning per job and side, and the "
                                    "same number of images per job", "positive")
        if self._plain:
            self._prepare_plain()

    # -- the plain case: one conditioning per side, one batch -----------------------------

    def _prepare_plain(self) -> None:
        import torch

        b = self.batch // self.jobs  # images per conditioning (per job)
        if self.guided:
            match = cond_rules.match_tokens if self.family.repeats_text else lambda p, n: (p, n)
            pairs = [match(p.embeds, n.embeds) for p, n in zip(self.positive, self.negative)]
            blocks = [n for _, n in pairs] + [p for p, _ in pairs]
            extras = [e.extra for e in self.negative] + [e.extra for e in self.positive]
        else:
            blocks = [e.embeds for e in self.positive]
            extras = [e.extra for e in self.positive]
        self._extras = extras
        #: Jobs whose prompts have other token counts: one network call per count (token_groups).
        self._groups = token_groups.split(blocks, extras, b, self.family, self.image_size, self.device, self.dtype)
        if self._groups is not None:
            return
        context = torch.cat([block.expand(b, -1, -1) for block in blocks])
        self._context = context.to(device=self.device, dtype=self.dtype)
        self._kwargs = self.family.network_kwargs(extras, b, self.image_size, self.device, self.dtype)

    def call(self, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict,
             extras: list[dict]) -> "torch.Tensor":
        """One network call in the network's dtype; the output in float32. ControlNets carried by
        the conditionings (``extra["control"]``) add their residuals (nodes.control.apply); GLIGEN
        boxes (``extra["gligen"]``) hook their fusers in for the call (nodes.families.grounding)."""
        import torch

        from nodes.control.apply import residuals
        from nodes.families.grounding import applied as grounded

        step_end = {"sigma_next": self.next_sigma(t)} if self._reads_next else {}

        def compute() -> "torch.Tensor":
            control = residuals(self, x, t, context, extras)
            full = self.family.extra_channels(x, extras)
            with grounded(self, x, extras):
                out = self.network(full.to(self.dtype), t, encoder_hidden_states=context, return_dict=False,
                                   **kwargs, **control, **step_end)[0]
            return out.to(torch.float32)

        if self.network_cache is not None:  # EasyCache may answer from its cache (nodes.families.step_cache)
            out = self.network_cache.network_call(x, self.batch // self.jobs, compute)
        else:
            out = compute()
        if self._from_network is None:
            return out
        # the model's sampling rule reads the output otherwise (nodes.samplers.velocity_rule)
        return self._from_network(out, float(self.schedule.sigma(t).reshape(-1)[0]))

    def _plain_call(self, x: "torch.Tensor", t: Any) -> "torch.Tensor":
        """The plain case's network output: one call, or one per token count (token_groups)."""
        if self._groups is not None:
            return token_groups.evaluate(self.call, self._groups, x, t)
        return self.call(x, t, self._context, self._kwargs, self._extras)

    # -- the loop's entry point ------------------------------------------------------------

    def model_output(self, model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        """The guided network output for the scheduler-scaled input ``model_in`` [B, C, h, w]."""
        cond, uncond = self.sides(model_in, t)
        return self.combined(cond, uncond, model_in, t)

    def sides(self, model_in: "torch.Tensor", t: Any) -> "tuple[torch.Tensor, torch.Tensor | None]":
        """Both sides' network outputs for ``model_in``, before any guidance: (conditional,
        unconditional), the unconditional None when the run is unguided (cfg 1)."""
        import torch

        if self._plain:
            if self.guided:
                uncond, cond = self._plain_call(torch.cat([model_in, model_in]), t).chunk(2)
                return cond, uncond
            return self._plain_call(model_in, t), None
        sigma = float(self.schedule.sigma(float(t))) if self.schedule is not None else None
        h, w = model_in.shape[2], model_in.shape[3]
        if self._sides is None or self._sides[0] != (h, w):
            self._sides = ((h, w), cond_rules.prepare(self.positive, self.negative, h, w, self.device))
        sides = [s for s in self._sides[1] if s]
        outputs = cond_rules.combine(self, sides, model_in, t, sigma)
        if sigma is not None and sigma > 0:
            outputs = [cond_rules.fill_uncovered(out, covered, model_in, sigma, self.prediction_type, self.sigma_data)
                       for out, covered in outputs]
        else:
            outputs = [out for out, _ in outputs]
        if not self.guided:
            return outputs[0], None
        cond, uncond = outputs
        return cond, uncond

    def combined(self, cond: "torch.Tensor", uncond: "torch.Tensor | None", model_in: "torch.Tensor", t: Any,
                 cfg: float | None = None) -> "torch.Tensor":
        """The guidance step on both sides' outputs (:meth:`sides`): CFG at ``cfg`` (this denoiser's
        own when None) with RescaleCFG or the guidance rules, then the post-CFG passes (SAG, skip-layer
        guidance, PAG) on this denoiser's network and prompts; ``uncond`` None: the unguided rule.
        A guider whose unconditional side comes from elsewhere (DualModelGuider's second model,
        nodes.families.dual_model) hands both here, as ComfyUI hands them to its CFG function."""
        if uncond is None:
            self.last_uncond = self.last_cond = cond
            return self._post_cfg(self._unguided(cond, model_in, t), cond, model_in, t)
        return self._guide(cond, uncond, model_in, t, self.cfg if cfg is None else float(cfg))

    def _guide(self, cond: "torch.Tensor", uncond: "torch.Tensor", model_in: "torch.Tensor", t: Any,
               cfg: float) -> "torch.Tensor":
        if self.skip_layers is not None and self.skip_layers.simple and self._in_window(t):
            uncond = self._skipped(self._side("negative"), model_in, t)  # SkipLayerGuidanceDiTSimple
        self.last_uncond, self.last_cond = uncond, cond
        if self._rules is not None:
            sigma = float(self.schedule.sigma(float(t)))
            plain = lambda c, u, z: self._cfg(c, u, z, t, cfg)  # noqa: E731
            guided = self._rules.apply(cond, uncond, model_in, sigma, self.prediction_type, cfg, plain,
                                       self.sigma_data)
        else:
            guided = self._cfg(cond, uncond, model_in, t, cfg)
        return self._post_cfg(guided, cond, model_in, t)

    def _post_cfg(self, guided: "torch.Tensor", cond: "torch.Tensor", model_in: "torch.Tensor",
                  t: Any) -> "torch.Tensor":
        """The guidance that reads further network passes, in a fixed order (ComfyUI applies its
        post-CFG hooks in the order the nodes were applied): SAG, skip-layer guidance, PAG."""
        guided = self._skip_layer_guided(self._self_attention_guided(guided, model_in, t), cond, model_in, t)
        return self._perturbation_guided(guided, cond, model_in, t)

    def _side(self, which: str) -> "Denoiser":
        """A single-prompt, unguided denoiser over one side's conditioning, made once: the extra
        passes of SAG (negative), skip-layer guidance and PAG (positive) run on it."""
        if which not in self._sides_alone:
            prompt = self._args["positive"] if which == "positive" else self._negative
            names = self._args["names"] if which == "positive" else (self._args["names"][1],) * 2
            self._sides_alone[which] = Denoiser(**{**self._args, "positive": prompt, "names": names},
                                                negative=None, cfg=1.0)
        return self._sides_alone[which]

    def _in_window(self, t: Any) -> bool:
        sigma = float(self.schedule.sigma(float(t)))
        return self.sigma_at_percent(self.skip_layers.end_percent) <= sigma <= \
            self.sigma_at_percent(self.skip_layers.start_percent)

    def _skipped(self, side: "Denoiser", model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        from nodes.families.skip_layers import skipping

        with skipping(self.family.dit_blocks(self.network), self.skip_layers.layers, self.family.dit_block_returns):
            return side.model_output(model_in, t)

    def _skip_layer_guided(self, guided: "torch.Tensor", cond: "torch.Tensor", model_in: "torch.Tensor",
                           t: Any) -> "torch.Tensor":
        """``guided`` moved away from the conditional prediction with some blocks skipped
        (SkipLayerGuidanceDiT, nodes.families.skip_layers), on clean predictions as ComfyUI's
        post-CFG hook; inside its window only."""
        settings = self.skip_layers
        if settings is None or settings.simple or not settings.scale or not self._in_window(t):
            return guided
        import torch

        from nodes.families.guidance_rules import Parametrisation
        from nodes.families.skip_layers import rescaled

        space = Parametrisation(self.prediction_type, model_in, float(self.schedule.sigma(float(t))), self.sigma_data)
        cond_x0 = space.to_x0(cond)
        if any(numbers for _, numbers in settings.layers):
            result = space.to_x0(guided) + settings.scale * (cond_x0 - space.to_x0(
                self._skipped(self._side("positive"), model_in, t)))
        else:  # nothing skipped (a family ComfyUI's replacements never reach): the skipped pass is cond itself
            result = space.to_x0(guided)
        if settings.rescaling_scale:
            per = result.shape[0] // self.jobs  # each job of a cross-job batch on its own, as its single run
            result = torch.cat([rescaled(result[i:i + per], cond_x0[i:i + per], settings.rescaling_scale)
                                for i in range(0, result.shape[0], per)])
        return space.from_x0(result)

    def _self_attention_guided(self, guided: "torch.Tensor", model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        """``guided`` moved by self-attention guidance (nodes.families.self_attention): two passes of
        an unconditional-only denoiser, one recording the middle block's attention, one on the
        degraded prediction; computed on clean-latent predictions, as ComfyUI's post-CFG hook."""
        if self.self_attention is None:
            return guided
        from nodes.families import self_attention as sag
        from nodes.families.guidance_rules import Parametrisation

        sigma = float(self.schedule.sigma(float(t)))
        if sigma <= 0 or min(model_in.shape[2:]) <= 4:  # nothing to guide; too small to blur (ComfyUI's limit)
            return guided
        unconditional = self._side("negative")
        with sag.recording(self.network) as recorder:
            uncond = unconditional.model_output(model_in, t)
        if recorder.probs is None or recorder.probs.shape[0] != model_in.shape[0] * recorder.heads:
            raise ConditioningError("self-attention guidance reads the negative prompt's attention in one network "
                                    "call: give it no areas or masks (and one length across a batch of jobs)",
                                    self._args["names"][1])
        space = Parametrisation(self.prediction_type, model_in, sigma, self.sigma_data)
        x0_u = space.to_x0(uncond)
        x0_d = sag.degraded(x0_u, recorder.probs, recorder.heads, self.self_attention.blur_sigma)
        z_d = (x0_d + space.x - x0_u) / space.scale
        x0_s = Parametrisation(self.prediction_type, z_d, sigma, self.sigma_data).to_x0(
            unconditional.model_output(z_d, t))
        return space.from_x0(space.to_x0(guided) + self.self_attention.scale * (x0_d - x0_s))

    def _cfg(self, cond: "torch.Tensor", uncond: "torch.Tensor", model_in: "torch.Tensor", t: Any,
             cfg: float) -> "torch.Tensor":
        """Plain classifier-free guidance at ``cfg``, rescaled if RescaleCFG is set (ComfyUI's CFG function)."""
        guided = self.family.combine_guidance(guide(cond, uncond, cfg), cond)
        if self.cfg_rescale:
            sigma = float(self.schedule.sigma(float(t)))
            guided = rescale_guidance(guided, cond, model_in, sigma, self.prediction_type, self.cfg_rescale,
                                      self.sigma_data)
        return guided

    def _unguided(self, out: "torch.Tensor", model_in: "torch.Tensor", t: Any) -> "torch.Tensor":
        """At cfg 1 the conditional output alone, except that guidance rules still run (as
        ComfyUI's hooks do, seeing an unconditional prediction of zeros)."""
        if self._rules is None:
            return out
        sigma = float(self.schedule.sigma(float(t)))
        return self._rules.apply(out, None, model_in, sigma, self.prediction_type, self.cfg, None, self.sigma_data)

    def _perturbation_guided(self, guided: "torch.Tensor", cond: "torch.Tensor", model_in: "torch.Tensor",
                             t: Any) -> "torch.Tensor":
        """``guided`` pushed away from the conditional prediction of the network with identity
        self-attention in its middle block, by ``pag_scale`` (diffusers' and ComfyUI's rule).
        The perturbed pass is a conditional-only denoiser over the same network: one more
        pass per evaluation, as diffusers' PAG pipeline makes."""
        if not self.pag_scale:
            return guided
        from nodes.families.perturbed import identity_middle_attention

        with identity_middle_attention(self.network):
            perturbed = self._side("positive").model_output(model_in, t)
        return guided + self.pag_scale * (cond - perturbed)

    def next_sigma(self, t: Any) -> float | None:
        """The noise level the sampler heads for from timestep ``t`` (schedules.next_sigma on the
        sample sigmas); None where the loop gave none or the model has no training schedule."""
        from nodes.samplers.schedules import next_sigma

        if self.sample_sigmas is None or self.schedule is None:
            return None
        return next_sigma(self.sample_sigmas, float(self.schedule.sigma(t).reshape(-1)[0]))

    def sigma_at_percent(self, percent: float) -> float:
        """ComfyUI's percent -> noise level (schedules.percent_to_sigma) on this model's schedule."""
        from nodes.samplers.schedules import percent_to_sigma

        return percent_to_sigma(self.schedule, percent)

    def predict(self, x: "torch.Tensor", sigma: float, prediction_type: str, timestep: Any) -> "torch.Tensor":
        """``denoised``: the clean-latent prediction at noise level ``sigma`` (k-diffusion's
        parameterisation x = x0 + sigma * eps, model input scaled by 1/sqrt(sigma^2 + 1))."""
        c_in = 1.0 / math.sqrt(sigma ** 2 + 1.0)
        out = self.model_output(x * c_in, timestep)
        if prediction_type == "epsilon":
            return x - sigma * out
        if prediction_type == "v_prediction":
            return x / (sigma ** 2 + 1) - out * (sigma / math.sqrt(sigma ** 2 + 1))
        if prediction_type == "sample":
            return out
        raise ConditioningError(f"unsupported prediction type {prediction_type}", "model")


def guide(cond: "torch.Tensor", uncond: "torch.Tensor", scale: float) -> "torch.Tensor":
    """Classifier-free guidance: ``uncond`` pushed towards ``cond`` by ``scale`` (1: ``cond``)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: "torch.Tensor", cond: "torch.Tensor", model_in: "torch.Tensor", sigma: float,
                     prediction_type: str, multiplier: float, sigma_data: float = 1.0) -> "torch.Tensor":
    """RescaleCFG (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", section 3.4): a high guidance scale inflates the prediction's spread, so the
    guided prediction is rescaled, image by image, to the standard deviation of the
    conditional one, and ``multiplier`` blends that with the plain result. As ComfyUI's
    RescaleCFG it works on the velocity v = sqrt(1 + sigma^2) eps - sigma z (z: the network's
    variance-preserving input) whatever the network predicts; on a v-prediction model that is
    diffusers' ``guidance_rescale``. Conversions are affine in the output, so guiding before
    converting is the same as after. A continuous-EDM F-prediction (``edm``, data spread
    ``sigma_data``) goes through its clean-latent prediction to that same velocity, ComfyUI's
    formula on its x whatever the model's preconditioning."""
    import torch

    if prediction_type not in ("epsilon", "v_prediction", "edm"):
        raise ConditioningError(f"RescaleCFG needs an epsilon, v-prediction or EDM model, not {prediction_type}",
                                "model")
    scale = math.sqrt(1.0 + sigma * sigma)
    space = None
    if prediction_type == "edm":
        from nodes.families.guidance_rules import Parametrisation

        space = Parametrisation("edm", model_in, sigma, sigma_data)
        z = space.x / scale  # the variance-preserving x / sqrt(1 + sigma^2) the velocity is measured on

    def to_v(out: "torch.Tensor") -> "torch.Tensor":
        if space is not None:
            return (z - scale * space.to_x0(out)) / sigma
        return out if prediction_type == "v_prediction" else scale * out - sigma * model_in

    v_guided, v_cond = to_v(guided), to_v(cond)
    dims = list(range(1, v_guided.ndim))
    rescaled = v_guided * (v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True))
    v_final = multiplier * rescaled + (1.0 - multiplier) * v_guided
    if space is not None:
        return space.from_x0((z - sigma * v_final) / scale)
    return v_final if prediction_type == "v_prediction" else (v_final + sigma * model_in) / scale


def _plain(side: list, jobs: int) -> bool:
    """One plain entry (cond_rules.is_plain) for each job of the batch."""
    return len(side) == jobs and all(cond_rules.is_plain([entry]) for entry in side)


def _check_references(family: Family, entries: list) -> None:
    """Reference latents on a model that cannot read them are an error, not silently dropped
    (ComfyUI drops them): the edit the user asked for would not happen."""
    if family.takes_references:
        return
    for entry in entries:
        if entry.extra.get("reference_latents"):
            name = entry.extra.get("_input", "positive")
            raise ConditioningError(f"{name} carries reference latents (ReferenceLatent), but this {family.name} "
                                    "model reads none: they need an edit model such as FLUX.1 Kontext", name)


def _check_width(network: Any, family: Family, entries: list) -> None:
    """A prompt encoded by another model's CLIP (SDXL base's on the refiner, SD 1.5's on SDXL) is
    an error naming the input, not a matrix-shape failure deep in the network."""
    if getattr(network, "checks_width_in_call", False):  # FLUX: after its pooled-output check
        return
    width = getattr(network, "text_width", None)  # a wrapped transformer states its own (SD3)
    if width is None:
        width = getattr(getattr(network, "config", None), "cross_attention_dim", None)
    if not isinstance(width, int):
        return
    for entry in entries:
        got = entry.embeds.shape[-1]
        if got != width:
            name = entry.extra.get("_input", "positive")
            raise ConditioningError(f"{name} was encoded by a text encoder {got} wide, but this {family.name} model "
                                    f"takes {width}: encode the prompt with this model's CLIP", name)
