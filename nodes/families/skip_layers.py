"""Skip-layer guidance (SkipLayerGuidanceSD3; diffusers' SD3 ``skip_guidance_layers``): inside a noise
window, the guided prediction is pushed away from a conditional prediction of the same network with
some transformer blocks left out, ``guided + scale * (cond - skipped)``, a second opinion in the
spirit of perturbed-attention guidance. The denoiser runs it (nodes.families.denoiser); the family
says how its network leaves blocks out (``Family.skipping``).

ComfyUI states it on clean-latent predictions; a flow model's x0 is ``x - t * v``, affine in the
velocity, so the same rule on the network's velocity (what diffusers does) is the same step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkipLayers:
    """Blocks ``layers`` skipped in the extra pass, its ``scale``, and the noise window
    [``sigma_end``, ``sigma_start``] (flow times) where it runs."""

    layers: tuple[int, ...]
    scale: float
    sigma_start: float
    sigma_end: float

    def active(self, sigma: float) -> bool:
        return bool(self.layers) and self.scale > 0 and self.sigma_end <= sigma <= self.sigma_start


def flow_sigma_at_percent(percent: float, shift: float) -> float:
    """ComfyUI's percent -> noise level on a shifted flow schedule (ModelSamplingDiscreteFlow):
    the flow time ``1 - percent``, shifted."""
    t = min(max(1.0 - float(percent), 0.0), 1.0)
    return shift * t / (1.0 + (shift - 1.0) * t)
