"""A model's sampling object: its noise levels, how noise is applied, what steps over them.

ComfyUI's custom-sampling nodes (BasicScheduler, SamplerCustomAdvanced, ...) and
KSamplerAdvanced never look at a model's training schedule themselves: they ask
this object, which the model's family provides (:meth:`Family.model_sampling`).
:class:`DiscreteSampling` is the one for the 1000-step DDPM-trained families
(SD 1.x/2.x/SDXL, epsilon or v prediction); a flow-matching family (FLUX) returns
its own (:class:`FlowSampling`) with the same methods, and the nodes run unchanged on it;
a continuous-EDM model (CosXL, Playground v2.5, ModelSamplingContinuousEDM/V) samples
through :class:`ContinuousSampling`.

Kiln's rules, kept equal to KSampler's so a custom-sampling graph gives KSampler's
result with the same settings:

* :meth:`sigmas` with ``denoise`` = 1 is the grid KSampler samples text to image on
  (diffusers' grid for the checkpoint's scheduler config, see
  ``schedules.diffusers_sigmas``); with ``denoise`` < 1 ComfyUI's ``steps / denoise``
  tail (``schedules.comfy_sigmas``), which is KSampler's rule for ``denoise`` too.
* :meth:`start` is ComfyUI's ``noise_scaling``: at (or above) the model's largest
  sigma the latent gets ``noise * sqrt(1 + sigma^2)``, otherwise ``noise * sigma``;
  an empty latent sampled from a lower first sigma gets diffusers' initial noise
  scale for that grid, as KSampler's text-to-image does.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

    from nodes.samplers.names import SamplerSpec


class _Sampling:
    """What every model sampling shares: its config and its training schedule (timestep <-> level),
    which gives the level range and the level of any timestep."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.schedule = self._training_schedule(self.config)

    @staticmethod
    def _training_schedule(config: dict) -> Any:
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def sigma_at(self, timestep: float) -> float:
        """The level of a (possibly fractional) training timestep."""
        return float(self.schedule.sigma(timestep))


class DiscreteSampling(_Sampling):
    """Model sampling of a discrete-time (DDPM-trained) model in k-diffusion's
    parameterisation: the state is x0 + sigma * noise."""

    @staticmethod
    def _training_schedule(config: dict) -> Any:
        from nodes.samplers.schedules import TrainingSchedule

        return TrainingSchedule(config)

    def sigmas(self, scheduler: str, steps: int, denoise: float = 1.0) -> "torch.Tensor":
        """The descending sigma list (ending in 0) for ``steps`` steps of ``scheduler`` at ``denoise``."""
        import torch

        from nodes.samplers import schedules

        if denoise > 0.9999:
            return schedules.diffusers_sigmas(self.config, scheduler, steps).to(torch.float32)
        return schedules.comfy_sigmas(self.schedule, scheduler, steps, denoise).to(torch.float32)

    def start(self, sigma0: float, noise: "torch.Tensor", x0: "torch.Tensor") -> "torch.Tensor":
        """The starting state at ``sigma0`` from the clean latent ``x0`` (model space) and ``noise``."""
        import torch

        full = math.isclose(self.sigma_max, sigma0, rel_tol=1e-5) or sigma0 > self.sigma_max
        if full:
            return x0 + noise * math.sqrt(1.0 + sigma0 ** 2)
        if not bool(torch.count_nonzero(x0)):
            from nodes.samplers.plan import init_noise_sigma

            return noise * init_noise_sigma(self.config, sigma0)
        return x0 + noise * sigma0

    def noised(self, x0: "torch.Tensor", noise: "torch.Tensor", sigma: float) -> "torch.Tensor":
        """The clean latent noised to ``sigma`` (what a noise mask holds the kept region to)."""
        return x0 + noise * sigma

    def stepper(self, spec: "SamplerSpec", sigmas: "torch.Tensor") -> tuple[Any, "torch.Tensor"]:
        """(scheduler-like stepper over ``sigmas``, the timesteps of its model evaluations)."""
        from nodes.samplers import steppers

        return steppers.follow(spec, self.config, sigmas)

    def to_state(self, stepper: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
        from nodes.samplers import steppers

        return steppers.to_state(stepper, x, sigma)

    def from_state(self, stepper: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
        from nodes.samplers import steppers

        return steppers.from_state(stepper, x, sigma)

    def notes(self, h: int, w: int) -> list[str]:
        return []  # the discrete schedule does not depend on the image size


class FlowSampling(_Sampling):
    """Model sampling of a flow-matching model (FLUX): the state at flow time t is
    ``t * noise + (1 - t) * x0`` and the sigmas *are* flow times (1 = pure noise).

    The grid, shift and stepper are :mod:`nodes.samplers.flow`'s, the ones KSampler
    samples FLUX with, so BasicScheduler at denoise 1 gives KSampler's sigmas and
    below 1 KSampler's ``steps / denoise`` tail. The resolution-dependent shift needs
    the image size, which a scheduler node is not given: it is the one ModelSamplingFlux
    fixed, otherwise ComfyUI's default size (``flow.DEFAULT_SHIFT_SIZE``, 1024 x 1024);
    :meth:`notes` says when the latent sampled is another size.
    """

    @staticmethod
    def _training_schedule(config: dict) -> Any:
        from nodes.samplers.flow import FlowSchedule

        return FlowSchedule(config)

    def sigmas(self, scheduler: str, steps: int, denoise: float = 1.0) -> "torch.Tensor":
        """The descending flow times (ending in 0) for ``steps`` steps of ``scheduler`` at ``denoise``;
        a schedule flow sampling lacks is a ConditioningError naming ``scheduler``."""
        import torch

        from nodes.samplers import flow

        flow.check_schedule(scheduler)
        if denoise <= 0.0:
            return torch.zeros(0)
        total = steps if denoise > 0.9999 else int(steps / denoise)
        size = flow.DEFAULT_SHIFT_SIZE // 8
        sched = flow.scheduler(self.config, scheduler, total, size, size)
        return sched.sigmas[total - steps:].to(torch.float32).clone()

    def start(self, sigma0: float, noise: "torch.Tensor", x0: "torch.Tensor") -> "torch.Tensor":
        """The state at flow time ``sigma0``: the blend diffusers' ``scale_noise`` makes (the latent
        itself under ModelSamplingAuraFlow's img_to_img_velocity, nodes.samplers.velocity_rule)."""
        from nodes.samplers import velocity_rule

        return velocity_rule.noise_scaling(self.config, x0, lambda: sigma0 * noise + (1.0 - sigma0) * x0)

    def noised(self, x0: "torch.Tensor", noise: "torch.Tensor", sigma: float) -> "torch.Tensor":
        return self.start(sigma, noise, x0)

    def stepper(self, spec: "SamplerSpec", sigmas: "torch.Tensor") -> tuple[Any, "torch.Tensor"]:
        """(flow stepper for ``spec`` over exactly ``sigmas``, its timesteps); a sampler flow sampling
        lacks is a ConditioningError naming ``sampler``."""
        from nodes.samplers import flow

        stepper = flow.follow(spec, self.config, sigmas)
        return stepper, stepper.timesteps

    def to_state(self, stepper: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
        return x  # the flow state is the latent itself

    def from_state(self, stepper: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
        return x

    def notes(self, h: int, w: int) -> list[str]:
        """What to tell the user about sampling a latent of h x w on sigmas made without its size."""
        from nodes.samplers import flow

        if not self.config.get("use_dynamic_shifting") or self.config.get(flow.SHIFT_SEQ_LEN) or \
                self.config.get("base_shift") == self.config.get("max_shift"):  # a fixed mu: no size in it
            return []
        per = 16 if self.config.get(flow.MU_RULE) == "per_pixel" else 8  # pixels per latent cell
        if (h * per // 16) * (w * per // 16) == (flow.DEFAULT_SHIFT_SIZE // 16) ** 2:
            return []
        return [f"the sigmas are shifted for {flow.DEFAULT_SHIFT_SIZE}x{flow.DEFAULT_SHIFT_SIZE} (ComfyUI's default; "
                f"the scheduler does not see the image), this latent is {w * per}x{h * per}: put ModelSamplingFlux "
                "with its width and height before the scheduler for the shift KSampler uses"]


class ContinuousSampling(_Sampling):
    """Model sampling of a continuous-time EDM model (CosXL, Playground v2.5, a model on
    ModelSamplingContinuousEDM/V): the state is x0 + sigma * noise with sigma anywhere in
    [sigma_min, sigma_max], the network's time a function of sigma (nodes.samplers.edm).

    :meth:`sigmas` is ComfyUI's schedule over that range at any ``denoise`` (an EDM model has
    no diffusers pipeline grid of its own to follow), :meth:`start` ComfyUI's noise scaling,
    and every sampler runs as a Kiln stepper in the k-diffusion state, so the state needs
    no conversion."""

    @staticmethod
    def _training_schedule(config: dict) -> Any:
        from nodes.samplers.edm import EDMSchedule

        return EDMSchedule(config)

    def sigmas(self, scheduler: str, steps: int, denoise: float = 1.0) -> "torch.Tensor":
        import torch

        from nodes.samplers import schedules

        return schedules.comfy_sigmas(self.schedule, scheduler, steps, denoise).to(torch.float32)

    def start(self, sigma0: float, noise: "torch.Tensor", x0: "torch.Tensor") -> "torch.Tensor":
        from nodes.samplers import edm

        return edm.start(self.schedule, sigma0, noise, x0)

    def noised(self, x0: "torch.Tensor", noise: "torch.Tensor", sigma: float) -> "torch.Tensor":
        return x0 + noise * sigma

    def stepper(self, spec: "SamplerSpec", sigmas: "torch.Tensor") -> tuple[Any, "torch.Tensor"]:
        """(Kiln stepper for ``spec`` over ``sigmas``, its network times); a sampler without an EDM
        form is a ConditioningError naming ``sampler``."""
        from nodes.samplers import edm

        stepper = edm.follow(spec, self.config, sigmas)
        return stepper, stepper.timesteps

    def to_state(self, stepper: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
        return x

    def from_state(self, stepper: Any, x: "torch.Tensor", sigma: float) -> "torch.Tensor":
        return x

    def notes(self, h: int, w: int) -> list[str]:
        return []


def for_model(model: Any) -> Any:
    """The sampling object of a MODEL handle, from its family (the seam a new family extends)."""
    return model.family.model_sampling(model.scheduler_config)
