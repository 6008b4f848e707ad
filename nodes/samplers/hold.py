"""Holding the unmasked region of a latent to the input while sampling (SetLatentNoiseMask).

ComfyUI's rule (``KSamplerX0Inpaint``): before every model evaluation the region
outside the noise mask is replaced by the input latent noised to the current
level with the run's own starting noise, and the result outside the mask is the
input latent itself. diffusers' inpainting pipeline for 4-channel models does the
same after each step (noising to the next timestep, the clean latent after the
last), which is the same latent the next evaluation sees, so both agree. The
mask may be soft (ComfyUI resizes it bilinearly to the latent): it blends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Hold:
    #: clean input latent, model space [B, C, h, w]
    x0: "torch.Tensor"
    #: the run's starting noise [B, C, h, w]
    noise: "torch.Tensor"
    #: 1 = repaint, 0 = keep; [B, 1, h, w] at latent size
    mask: "torch.Tensor"
    #: the model's sampling object (nodes.samplers.model_sampling): how the input is noised to a
    #: level (x0 + sigma * noise for DDPM-trained models, a blend for flow models)
    sampling: Any

    def to(self, device: Any) -> "Hold":
        return Hold(self.x0.to(device), self.noise.to(device), self.mask.to(device), self.sampling)

    def noised(self, sched: Any, t: Any) -> "torch.Tensor":
        """The input latent at the level of this evaluation, in the state space ``sched`` steps in.

        Samplers that keep sigmas (diffusers' k-style and multistep classes, Kiln's
        steppers, the flow steppers) get the model sampling's noised state at the sigma
        the scheduler evaluates now, midpoints of second-order samplers included
        (diffusers' ``add_noise`` would use the step's first sigma there, and the
        network's timestep may be rounded). Timestep-only schedulers (DDIM, PLMS, DDPM,
        LCM on their grids) use their own ``add_noise``.
        """
        import torch

        if getattr(sched, "sigmas", None) is None and getattr(sched, "stages", None) is None:
            ts = torch.as_tensor(t).reshape(1).repeat(self.x0.shape[0])
            return sched.add_noise(self.x0, self.noise, ts)
        sigma = self._current_sigma(sched, t)
        return self.sampling.to_state(sched, self.sampling.noised(self.x0, self.noise, sigma), sigma)

    def _current_sigma(self, sched: Any, t: Any) -> float:
        stages = getattr(sched, "stages", None)
        if stages is not None:  # Kiln's two-stage stepper: (step, stage, sigma) per evaluation
            return float(stages[sched._index][2])
        index = getattr(sched, "_index", None)  # Kiln's one-evaluation-per-step steppers
        if index is None and hasattr(sched, "step_index"):  # diffusers' schedulers
            if sched.step_index is None and hasattr(sched, "_init_step_index"):
                sched._init_step_index(t)  # what scale_model_input is about to do
            index = sched.step_index
        if index is None:
            return float(self.sampling.sigma_at(float(t)))
        if getattr(sched, "state_in_first_order", True) is False:  # a second-order midpoint
            for name in ("sigmas_interpol", "mid_point_sigma"):
                value = getattr(sched, name, None)
                if value is not None:
                    return float(value[index] if name == "sigmas_interpol" else value)
        return float(sched.sigmas[index])

    def before(self, sched: Any, x: "torch.Tensor", t: Any) -> "torch.Tensor":
        return x * self.mask + self.noised(sched, t).to(x.dtype) * (1 - self.mask)

    def finish(self, raw_in: "torch.Tensor", raw_out: "torch.Tensor") -> "torch.Tensor":
        """The sampled latent with the unmasked region set to the input, in raw VAE space so
        the kept pixels are the input's bit for bit (no round trip through the latent scale)."""
        mask = self.mask.to(raw_out.device, raw_out.dtype)
        return raw_out * mask + raw_in.to(raw_out.dtype) * (1 - mask)
