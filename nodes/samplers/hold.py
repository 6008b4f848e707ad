"""Holding the unmasked region of a latent to the input while sampling (SetLatentNoiseMask).

ComfyUI's rule (``KSamplerX0Inpaint``): before every model evaluation the region
outside the noise mask is replaced by the input latent noised to the current
level with the run's own starting noise, and the result outside the mask is the
input latent itself. diffusers' inpainting pipeline for 4-channel models does the
same after each step (noising to the next timestep, the clean latent after the
last), which is the same latent the next evaluation sees, so both agree. The
mask may be soft (ComfyUI resizes it bilinearly to the latent): it blends.

Differential diffusion (``strength`` set; ComfyUI's DifferentialDiffusion node) turns a soft
mask into a schedule instead: at each evaluation the pixels whose mask value reaches the
run's progress threshold are free, the rest held, where the threshold falls from 1 at the
run's first level to 0 at its last (linear in the model's timestep, ComfyUI's rule), so a
pixel masked at 0.3 is repainted over the last 30 % of the run only. A strength below 1
blends that binary mask with the soft one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    #: differential diffusion's strength (None: the mask as it is, every step)
    strength: float | None = None
    #: the level the run stops at (0, or a split list's end): the threshold reaches 0 there
    end_sigma: float = 0.0
    _first_sigma: float | None = field(default=None, repr=False)
    _last_mask: Any = field(default=None, repr=False)

    def to(self, device: Any) -> "Hold":
        """Moved to ``device`` in place (the caller keeps the same object for :meth:`finish`)."""
        self.x0, self.noise, self.mask = self.x0.to(device), self.noise.to(device), self.mask.to(device)
        return self

    def mask_at(self, sigma: float) -> "torch.Tensor":
        """The mask this evaluation holds by: the soft mask, or differential diffusion's."""
        if self.strength is None:
            return self.mask
        if self._first_sigma is None:
            self._first_sigma = sigma
        timestep = self.sampling.schedule.timestep
        last = float(timestep(max(self.sampling.sigma_min, self.end_sigma)))
        span = float(timestep(self._first_sigma)) - last
        threshold = (float(timestep(sigma)) - last) / span if span > 0 else 0.0
        free = (self.mask >= threshold).to(self.mask.dtype)
        if self.strength and self.strength < 1:  # ComfyUI's rule: strength 0 counts as 1
            return self.strength * free + (1 - self.strength) * self.mask
        return free

    def noised(self, sched: Any, t: Any, sigma: float | None = None) -> "torch.Tensor":
        """The input latent at the level of this evaluation, in the state space ``sched`` steps in.

        Samplers that keep sigmas (diffusers' k-style and multistep classes, Kiln's
        steppers, the flow steppers) get the model sampling's noised state at the sigma
        the scheduler evaluates now, midpoints of second-order samplers included
        (diffusers' ``add_noise`` would use the step's first sigma there, and the
        network's timestep may be rounded). Timestep-only schedulers (DDIM, PLMS, DDPM,
        LCM on their grids) use their own ``add_noise``.
        """
        import torch

        if not self._follows_sigmas(sched):
            ts = torch.as_tensor(t).reshape(1).repeat(self.x0.shape[0])
            return sched.add_noise(self.x0, self.noise, ts)
        sigma = self._current_sigma(sched, t) if sigma is None else sigma
        return self.sampling.to_state(sched, self.sampling.noised(self.x0, self.noise, sigma), sigma)

    @staticmethod
    def _follows_sigmas(sched: Any) -> bool:
        return getattr(sched, "sigmas", None) is not None or getattr(sched, "stages", None) is not None

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
        sigma = None
        mask = self.mask
        if self.strength is not None:
            sigma = self._current_sigma(sched, t) if self._follows_sigmas(sched) else self.sampling.sigma_at(float(t))
            mask = self._last_mask = self.mask_at(sigma)
        return x * mask + self.noised(sched, t, sigma).to(x.dtype) * (1 - mask)

    def finish(self, raw_in: "torch.Tensor", raw_out: "torch.Tensor") -> "torch.Tensor":
        """The sampled latent with the unmasked region set to the input, in raw VAE space so
        the kept pixels are the input's bit for bit (no round trip through the latent scale);
        with differential diffusion, the region its last evaluation held."""
        mask = (self.mask if self._last_mask is None else self._last_mask).to(raw_out.device, raw_out.dtype)
        return raw_out * mask + raw_in.to(raw_out.dtype) * (1 - mask)
