"""How a flow model's network output and starting state are read: ModelSamplingAuraFlow's ``sampling``.

``flow`` (the default, every flow family's own rule): the state at flow time t is
``(1 - t) x0 + t noise`` and the network predicts the velocity ``noise - x0``, so the
clean-latent prediction is ``x - t v``.

``img_to_img_velocity`` (ComfyUI's IMG_TO_IMG_VELOCITY, which Marigold v2's Qwen-Image-Edit
fine-tunes were trained with): the network's output is the whole way from the state to the
clean latent, ``denoised = x - v`` at any sigma (no sigma factor), and noise scaling leaves
the latent as it is, whatever the sigma (no noise is mixed in). What the network sees (the
state, unscaled, at the flow's timestep) and the end state (not rescaled at sigma 0) are the
flow's. With sigmas [0.5, 0] and euler the result is ``z - v(z, 0.5)``.

Kiln keeps the flow's whole sampling machinery (grids, steppers, guidance, previews) for it
and applies the rule at its two seams, each reading this module:

* the network's output becomes the flow velocity every stepper reads, ``v / t``
  (:func:`from_network`, applied once per network call by the denoiser through the model's
  training schedule), so ``x - t (v / t) = x - v`` for every sampler, guidance rule and preview;
* the starting state and a noise mask's held region are the latent itself
  (:func:`noise_scaling`, for the custom-sampling nodes' FlowSampling and KSampler's plan alike).

The rule is a key of the MODEL handle's scheduler config (:data:`KEY`), so every sampler
node honours it and a later model-sampling node replaces it, as ComfyUI's replace the whole
sampling object.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch

#: Kiln's key in a flow scheduler config: the sampling rule (absent: :data:`FLOW`).
KEY = "kiln_sampling"
FLOW = "flow"
IMG_TO_IMG = "img_to_img_velocity"
#: ModelSamplingAuraFlow's ``sampling`` choices, ComfyUI's order.
CHOICES = (FLOW, IMG_TO_IMG)


def rule(config: Mapping[str, Any]) -> str:
    """The sampling rule of a flow model's scheduler config."""
    return str(config.get(KEY, FLOW))


def with_rule(config: Mapping[str, Any], sampling: str) -> dict[str, Any]:
    """``config`` sampled by ``sampling`` (one of :data:`CHOICES`); "flow" leaves no key behind."""
    if sampling not in CHOICES:
        raise ValueError(f"sampling must be one of {', '.join(CHOICES)}, got {sampling!r}")
    out = {k: v for k, v in config.items() if k != KEY}
    if sampling != FLOW:
        out[KEY] = sampling
    return out


def noise_scaling(config: Mapping[str, Any], x0: "torch.Tensor", blend: Callable[[], "torch.Tensor"]) -> "torch.Tensor":
    """The state sampling starts from (or a noise mask holds to): the flow's ``blend()`` of the
    latent with noise, or, under img_to_img_velocity, the latent ``x0`` itself."""
    return x0 if rule(config) == IMG_TO_IMG else blend()


def from_network(config: Mapping[str, Any]) -> "Callable[[torch.Tensor, float], torch.Tensor] | None":
    """What turns the network's output at flow time ``sigma`` into the flow velocity the steppers
    read; None where the output already is one (the flow rule)."""
    if rule(config) != IMG_TO_IMG:
        return None

    def velocity(out: "torch.Tensor", sigma: float) -> "torch.Tensor":
        # x - sigma * (out / sigma) = x - out: ComfyUI's denoised for this rule. The model is
        # never evaluated at sigma 0 (the last level is only stepped to).
        return out / sigma

    return velocity
