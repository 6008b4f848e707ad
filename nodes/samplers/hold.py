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
    #: nodes.samplers.schedules.TrainingSchedule, for samplers without add_noise
    schedule: Any = None

    def to(self, device: Any) -> "Hold":
        return Hold(self.x0.to(device), self.noise.to(device), self.mask.to(device), self.schedule)

    def noised(self, sched: Any, t: Any) -> "torch.Tensor":
        """The input latent at timestep ``t`` in the state space ``sched`` steps in."""
        import torch

        from nodes.samplers.steppers import to_state

        if hasattr(sched, "add_noise"):  # diffusers' schedulers, native grid or a given sigma list
            ts = torch.as_tensor(t).reshape(1).repeat(self.x0.shape[0])
            return sched.add_noise(self.x0, self.noise, ts)
        sigma = float(self.schedule.sigma(float(t)))  # Kiln's steppers: x = x0 + sigma * noise
        return to_state(sched, self.x0 + self.noise * sigma, sigma)

    def before(self, sched: Any, x: "torch.Tensor", t: Any) -> "torch.Tensor":
        return x * self.mask + self.noised(sched, t).to(x.dtype) * (1 - self.mask)

    def finish(self, raw_in: "torch.Tensor", raw_out: "torch.Tensor") -> "torch.Tensor":
        """The sampled latent with the unmasked region set to the input, in raw VAE space so
        the kept pixels are the input's bit for bit (no round trip through the latent scale)."""
        mask = self.mask.to(raw_out.device, raw_out.dtype)
        return raw_out * mask + raw_in.to(raw_out.dtype) * (1 - mask)
