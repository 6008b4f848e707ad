"""A model's sampling object: its noise levels, how noise is applied, what steps over them.

ComfyUI's custom-sampling nodes (BasicScheduler, SamplerCustomAdvanced, ...) and
KSamplerAdvanced never look at a model's training schedule themselves: they ask
this object, which the model's family provides (:meth:`Family.model_sampling`).
:class:`DiscreteSampling` is the one for the 1000-step DDPM-trained families
(SD 1.x/2.x/SDXL, epsilon or v prediction); a flow-matching family (FLUX) returns
its own object with the same four methods, and the nodes run unchanged on it.

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


class DiscreteSampling:
    """Model sampling of a discrete-time (DDPM-trained) model in k-diffusion's
    parameterisation: the state is x0 + sigma * noise."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        from nodes.samplers.schedules import TrainingSchedule

        self.config = dict(config)
        self.schedule = TrainingSchedule(self.config)

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

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


def for_model(model: Any) -> Any:
    """The sampling object of a MODEL handle, from its family (the seam a new family extends).

    A flow-matching model (FLUX) whose family does not yet override ``model_sampling`` is
    refused by name rather than sampled on a discrete schedule it was not trained with."""
    from engine.context import NodeError
    from nodes.families.base import Family
    from nodes.samplers import flow

    if flow.is_flow(model.scheduler_config) and type(model.family).model_sampling is Family.model_sampling:
        raise NodeError(f"the custom-sampling nodes cannot sample this {model.family.name} (flow-matching) model "
                        "yet; use KSampler", "model")
    return model.family.model_sampling(model.scheduler_config)
