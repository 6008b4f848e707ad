"""Guidance rules: ComfyUI's model patches that change how the conditional and unconditional
predictions combine (CFGZeroStar, APG, CFGNorm, TCFG, Mahiro, RenormCFG, Epsilon Scaling,
FreSca, LatentApplyOperationCFG).

ComfyUI states all of them on *denoised* predictions (the clean latent x0 each side
predicts) and its sampler input ``x`` (k-diffusion's x = x0 + sigma * eps for a DDPM
model, the flow state itself for a flow model), in three stages:

* ``pre``: rewrite the (cond, uncond) pair before they are combined (APG, TCFG, FreSca,
  LatentApplyOperationCFG), ComfyUI's ``sampler_pre_cfg_function``;
* ``combine``: replace ``uncond + cfg * (cond - uncond)`` itself (RenormCFG); the last
  one applied wins, as ComfyUI keeps a single CFG function;
* ``post``: rewrite the combined result, seeing both sides too (CFGZeroStar, CFGNorm, Mahiro,
  Epsilon Scaling), ComfyUI's ``sampler_post_cfg_function``.

A MODEL handle carries them as one ordered tuple (``SamplingPatches.guidance``, in the
order the nodes were applied, which is ComfyUI's order within each stage). The denoiser
hands its network outputs to one :class:`GuidanceRun` per sampling run: it converts them
to x0, runs the stages, and converts the result back into the network's prediction space.
The conversions are affine and exactly inverted, so a run whose rules change nothing gives
plain CFG up to float rounding. Rules are frozen settings; running state (APG's momentum)
lives in the run, so each sampling run starts fresh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from nodes.families.base import ConditioningError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Step:
    """One evaluation as ComfyUI's hooks see it: the sampler input ``x``, the noise level,
    the guidance scale, and both sides' clean-latent predictions."""

    x: Any
    sigma: float
    scale: float
    cond: Any
    uncond: Any
    #: The evaluation's Parametrisation, for rules that bring predictions of their own.
    space: Any = None
    #: The rows of the whole batch this step covers (one job's images in a cross-job batch).
    rows: slice = field(default_factory=lambda: slice(None))


class Rule:
    """A guidance rule's settings; ``stage`` says where it acts (see the module docstring)."""

    stage: ClassVar[str] = "post"
    #: Whether it needs a real unconditional prediction (at cfg 1 none is evaluated).
    needs_uncond: ClassVar[bool] = False

    def fresh_state(self) -> Any:
        """The running state one sampling run starts with (None: stateless)."""
        return None

    def changes_nothing(self) -> bool:
        """Whether these settings make the rule the identity. The nodes then add no rule, so the
        handle samples bit for bit as the one they were given (the x0 round trip a rule costs
        would otherwise leave float rounding behind)."""
        return False

    def pre(self, step: Step, state: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def combine(self, step: Step) -> Any:
        raise NotImplementedError

    def post(self, step: Step, guided: Any) -> Any:
        raise NotImplementedError


def _per_image(t: "torch.Tensor") -> "torch.Tensor":
    return t.reshape(t.shape[0], -1)


def _image_shape(t: "torch.Tensor") -> list[int]:
    return [t.shape[0]] + [1] * (t.ndim - 1)


@dataclass(frozen=True)
class CFGZeroStar(Rule):
    """CFG-Zero* (Fan et al. 2025): the unconditional prediction is rescaled by the
    least-squares factor that best matches the conditional one (measured on x - x0, the
    noise each side sees), which corrects the guidance direction of flow models early on."""

    stage: ClassVar[str] = "post"

    def post(self, step: Step, guided: Any) -> Any:
        cond_noise, uncond_noise = _per_image(step.x - step.cond), _per_image(step.x - step.uncond)
        alpha = (cond_noise * uncond_noise).sum(1) / (uncond_noise.pow(2).sum(1) + 1e-8)
        alpha = alpha.reshape(_image_shape(guided))
        return guided + step.uncond * (alpha - 1.0) + step.scale * step.uncond * (1.0 - alpha)


@dataclass(frozen=True)
class CFGNorm(Rule):
    """Each pixel's guided prediction shrunk (never grown) to the conditional one's length
    over the channels, then scaled by ``strength``: guidance may turn the prediction but not
    inflate it."""

    strength: float = 1.0
    stage: ClassVar[str] = "post"

    def post(self, step: Step, guided: Any) -> Any:
        ratio = step.cond.norm(dim=1, keepdim=True) / (guided.norm(dim=1, keepdim=True) + 1e-8)
        return guided * ratio.clamp(0.0, 1.0) * self.strength


@dataclass
class _Momentum:
    average: Any = None
    last_sigma: float | None = None


@dataclass(frozen=True)
class APG(Rule):
    """Adaptive projected guidance (Sadat et al. 2024): the guidance vector (cond - uncond),
    optionally averaged over steps (``momentum``) and capped in length (``norm_threshold``),
    is split into its parts along and across the conditional prediction; the part along it,
    which oversaturates, is weighted by ``eta``. As in ComfyUI the rewritten conditional
    side is built so that CFG at scale s then gives ``uncond + s * guidance' + (cond - uncond)``:
    with eta 1 and no cap or momentum that is plain CFG at s + 1."""

    eta: float = 1.0
    norm_threshold: float = 5.0
    momentum: float = 0.0
    stage: ClassVar[str] = "pre"

    def fresh_state(self) -> _Momentum:
        return _Momentum()

    def pre(self, step: Step, state: _Momentum) -> tuple[Any, Any]:
        import torch

        if state.last_sigma is not None and step.sigma > state.last_sigma:  # a new descent: forget
            state.average = None
        state.last_sigma = step.sigma
        dims = [-1, -2, -3]
        guidance = step.cond - step.uncond
        if self.momentum != 0:
            state.average = guidance if state.average is None else self.momentum * state.average + guidance
            guidance = state.average
        if self.norm_threshold > 0:
            length = guidance.norm(p=2, dim=dims, keepdim=True)
            guidance = guidance * torch.minimum(torch.ones_like(length), self.norm_threshold / length)
        direction = torch.nn.functional.normalize(step.cond, dim=dims)
        along = (guidance * direction).sum(dim=dims, keepdim=True) * direction
        rewritten = (guidance - along) + self.eta * along
        cond = step.uncond + rewritten + (step.cond - step.uncond) / step.scale
        return cond, step.uncond


@dataclass(frozen=True)
class TCFG(Rule):
    """Tangential-damping CFG (Kwon et al. 2025): the unconditional noise keeps only its
    component along the leading right-singular vector of the [uncond; cond] noise pair, so the
    part of it tangent to the conditional one stops pulling the result off course."""

    stage: ClassVar[str] = "pre"
    needs_uncond: ClassVar[bool] = True

    def pre(self, step: Step, state: Any) -> tuple[Any, Any]:
        import torch

        cond_noise = (step.x - step.cond).reshape(step.x.shape[0], 1, -1).float()
        uncond_noise = (step.x - step.uncond).reshape(step.x.shape[0], 1, -1).float()
        _, _, vh = torch.linalg.svd(torch.cat([uncond_noise, cond_noise], dim=1), full_matrices=False)
        leading = vh[:, :1, :]
        damped = (uncond_noise @ leading.transpose(-2, -1)) * leading
        return step.cond, step.x - damped.reshape(step.uncond.shape).to(step.uncond.dtype)


@dataclass(frozen=True)
class Mahiro(Rule):
    """Mahiro's guidance: blends CFG's result with the conditional prediction scaled by cfg
    (its "direction"), by how similar (cosine, on signed square roots) the unconditional
    prediction scaled by cfg is to the mean of those two; the more alike, the more CFG."""

    stage: ClassVar[str] = "post"

    def post(self, step: Step, guided: Any) -> Any:
        import torch

        leap = step.cond * step.scale
        uncond_leap = step.uncond * step.scale
        merged = (leap + guided) / 2
        signed_root = lambda t: torch.sqrt(t.abs()) * t.sign()  # noqa: E731
        similarity = torch.nn.functional.cosine_similarity(signed_root(uncond_leap), signed_root(merged)).mean()
        weight = 2 * (similarity + 1)
        return (weight * guided + (4 - weight) * leap) / 4


@dataclass(frozen=True)
class RenormCFG(Rule):
    """Lumina's renormalised CFG: below noise level ``cfg_trunc`` plain CFG whose length is
    capped at ``renorm_cfg`` times the conditional prediction's (0: uncapped); at and above it
    the conditional prediction alone. ComfyUI caps on the whole batch's lengths (it fails
    beyond one image); Kiln caps image by image."""

    cfg_trunc: float = 100.0
    renorm_cfg: float = 1.0
    stage: ClassVar[str] = "combine"

    def combine(self, step: Step) -> Any:
        if not step.sigma < self.cfg_trunc:
            return step.cond
        guided = step.uncond + step.scale * (step.cond - step.uncond)
        if self.renorm_cfg > 0:
            from torch.linalg import vector_norm

            dims = tuple(range(1, guided.ndim))
            cap = vector_norm(step.cond, dim=dims, keepdim=True) * self.renorm_cfg
            length = vector_norm(guided, dim=dims, keepdim=True)
            guided = guided * (cap / length).where(length >= cap, 1.0)
        return guided


@dataclass(frozen=True)
class EpsilonScaling(Rule):
    """Epsilon scaling (Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models"),
    uniform schedule: the noise the guided prediction implies, x - x0, divided by ``factor``
    (above 1: a little less noise removed per step), which offsets the exposure bias of
    sampling from the network's own predictions. A post-CFG rule, as in ComfyUI, so it also
    runs at cfg 1."""

    factor: float = 1.005
    stage: ClassVar[str] = "post"

    def changes_nothing(self) -> bool:
        return self.factor == 1.0

    def post(self, step: Step, guided: Any) -> Any:
        return step.x - (step.x - guided) / self.factor


def frequency_scaled(x: "torch.Tensor", low: float, high: float, cutoff: int) -> "torch.Tensor":
    """``x`` with its 2-D spectrum (last two axes, zero frequency centred) scaled by ``low``
    inside the centred box reaching ``cutoff`` bins each way (clipped to half the axis) and
    by ``high`` outside it; computed in float32, returned in ``x``'s dtype."""
    import torch

    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    weights = torch.full(spectrum.shape[-2:], float(high), device=x.device)
    (rows, cols) = (n // 2 for n in spectrum.shape[-2:])
    reach_r, reach_c = min(cutoff, rows), min(cutoff, cols)
    weights[rows - reach_r:rows + reach_r, cols - reach_c:cols + reach_c] = float(low)
    back = torch.fft.ifftn(torch.fft.ifftshift(spectrum * weights, dim=(-2, -1)), dim=(-2, -1))
    return back.real.to(x.dtype)


@dataclass(frozen=True)
class FreSca(Rule):
    """FreSca (Huang et al. 2025): the guidance difference cond - uncond is scaled by frequency
    band, ``scale_low`` for its coarse layout and ``scale_high`` for its detail, and the
    conditional side rebuilt from it. A pre-CFG rule that, as in ComfyUI, needs a real
    unconditional side (it does nothing at cfg 1)."""

    scale_low: float = 1.0
    scale_high: float = 1.25
    freq_cutoff: int = 20
    stage: ClassVar[str] = "pre"
    needs_uncond: ClassVar[bool] = True

    def changes_nothing(self) -> bool:
        return self.scale_low == 1.0 and self.scale_high == 1.0

    def pre(self, step: Step, state: Any) -> tuple[Any, Any]:
        guidance = frequency_scaled(step.cond - step.uncond, self.scale_low, self.scale_high, self.freq_cutoff)
        return step.uncond + guidance, step.uncond


@dataclass(frozen=True)
class LatentOperationCFG(Rule):
    """LatentApplyOperationCFG: a LATENT_OPERATION (nodes.latent_operations) applied to the
    guidance difference cond - uncond, the conditional side rebuilt from the result. A pre-CFG
    rule; at cfg 1 the unconditional side is ComfyUI's zeros, so the operation sees the
    conditional prediction itself."""

    operation: Any = None
    stage: ClassVar[str] = "pre"

    def changes_nothing(self) -> bool:
        return bool(self.operation.changes_nothing())

    def pre(self, step: Step, state: Any) -> tuple[Any, Any]:
        return self.operation(step.cond - step.uncond) + step.uncond, step.uncond


class Parametrisation:
    """The network's output <-> clean-latent prediction at one noise level. ``model_in`` is
    what the network saw: x / sqrt(sigma_data^2 + sigma^2) for a DDPM model (sigma_data 1) or a
    continuous-EDM one, the state itself for a flow model, so ComfyUI's x is that times
    ``self.scale``."""

    def __init__(self, prediction_type: str, model_in: Any, sigma: float, sigma_data: float = 1.0) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "edm", "flow", "sample"):
            raise ConditioningError(f"guidance patches do not know prediction type {prediction_type}", "model")
        self.kind, self.z, self.sigma, self.sigma_data = prediction_type, model_in, sigma, sigma_data
        self.scale = 1.0 if prediction_type == "flow" else math.sqrt(sigma_data * sigma_data + sigma * sigma)
        self.x = model_in * self.scale

    def to_x0(self, out: Any) -> Any:
        """The samplers' own rule (kdiffusion.denoised_from, on ComfyUI's x)."""
        from nodes.samplers.kdiffusion import denoised_from

        return denoised_from(self.kind, out, self.x, self.sigma, self.sigma_data)

    def from_x0(self, x0: Any) -> Any:
        if self.kind == "edm":  # Karras et al.'s F = (x0 - c_skip x) / c_out
            var = self.sigma_data * self.sigma_data
            c_out = self.sigma * self.sigma_data / math.sqrt(self.sigma ** 2 + var)
            return (x0 - self.x * (var / (self.sigma ** 2 + var))) / c_out
        if self.kind == "epsilon":
            return (self.x - x0) / self.sigma
        if self.kind == "v_prediction":
            return (self.z - x0 * self.scale) / self.sigma
        if self.kind == "flow":
            return (self.z - x0) / self.sigma
        return x0


class GuidanceRun:
    """The rules of one sampling run, with their running state.

    In a cross-job batch (``jobs`` > 1: queued jobs sampled together, each the same number of
    images in a row) each job's rows are guided on their own, with their own state: rules with
    batch-wide statistics (Mahiro's mean similarity, Perp-Neg's projection) would otherwise let
    one job's images change another's, where each must equal its single run."""

    def __init__(self, rules: tuple[Rule, ...], jobs: int = 1) -> None:
        self.rules = tuple(rules)
        self.jobs = max(1, int(jobs))
        self._states = [[rule.fresh_state() for rule in self.rules] for _ in range(self.jobs)]
        combines = [rule for rule in self.rules if rule.stage == "combine"]
        self._combine = combines[-1] if combines else None

    def apply(self, cond: Any, uncond: Any | None, model_in: Any, sigma: float, prediction_type: str, scale: float,
              plain: Callable[[Any, Any, Any], Any] | None, sigma_data: float = 1.0) -> Any:
        """The guided network output from both sides' outputs (``uncond`` None: cfg 1, where
        ComfyUI evaluates no unconditional side and its hooks see zeros for it). ``plain(cond,
        uncond, model_in)`` combines network outputs when no rule replaces the combination (CFG,
        and RescaleCFG if set). ``sigma_data``: a continuous-EDM model's data spread."""
        import torch

        if sigma <= 0:  # nothing left to guide (and no noise to convert through)
            return cond if uncond is None else plain(cond, uncond, model_in)
        size = cond.shape[0] // self.jobs
        parts = []
        for job in range(self.jobs):
            rows = slice(job * size, (job + 1) * size) if self.jobs > 1 else slice(None)
            parts.append(self._one_job(cond[rows], None if uncond is None else uncond[rows], model_in[rows], sigma,
                                       prediction_type, scale, plain, rows, self._states[job], sigma_data))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _one_job(self, cond: Any, uncond: Any | None, model_in: Any, sigma: float, prediction_type: str,
                 scale: float, plain: Any, rows: slice, states: list, sigma_data: float = 1.0) -> Any:
        import torch

        space = Parametrisation(prediction_type, model_in, sigma, sigma_data)
        c0 = space.to_x0(cond)
        u0 = torch.zeros_like(c0) if uncond is None else space.to_x0(uncond)
        for rule, state in zip(self.rules, states):
            if rule.stage == "pre" and not (uncond is None and rule.needs_uncond):
                c0, u0 = rule.pre(Step(space.x, sigma, scale, c0, u0, space, rows), state)
        step = Step(space.x, sigma, scale, c0, u0, space, rows)
        if self._combine is not None:
            guided = self._combine.combine(step)
        elif uncond is None:
            guided = u0 + scale * (c0 - u0)
        else:
            guided = space.to_x0(plain(space.from_x0(c0), space.from_x0(u0), model_in))
        for rule in self.rules:
            if rule.stage == "post" and not (uncond is None and rule.needs_uncond):
                guided = rule.post(step, guided)
        return space.from_x0(guided)
