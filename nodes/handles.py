"""The values that travel on MODEL, CLIP, VAE, CONDITIONING and LATENT sockets.

Loaders produce these; the sampling and latent nodes consume them. They are light
handles: the weights belong to the model manager (engine.models), which places
them on a device when a node uses them and may offload them in between. Cache
entries therefore hold handles, never a second copy of a model.

Conventions (ComfyUI's, so LATENT and CONDITIONING values look the same to
custom-node authors):

* IMAGE: float32 tensor [B, H, W, C] in 0..1, on the CPU.
* MASK: float32 tensor [B, H, W] in 0..1.
* LATENT: dict {"samples": tensor [B, C, h, w] *unscaled* (raw VAE space), plus
  optional keys}. The MODEL's ``latent_scale`` is applied inside sampling.
  AddNoise adds {"noise": tensor like samples, "strength": float, "seed": int}.
* CONDITIONING: list of [embeds tensor [1, tokens, dim], {"pooled_output": tensor | None, ...}].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # node modules stay importable without torch, so `kiln serve` starts fast
    import torch


@dataclass(eq=False)
class ModelHandle:
    """MODEL: a denoiser (UNet) plus what sampling must know about it."""

    family: str  # "sd1" | "sd2" | "sdxl"
    #: diffusers scheduler config of the checkpoint (betas, prediction_type, ...).
    scheduler_config: dict[str, Any]
    #: VAE latent scaling factor (0.18215 for SD1/SD2, 0.13025 for SDXL).
    latent_scale: float
    latent_channels: int = 4
    #: Returns a context manager yielding the UNet on the compute device and dtype.
    _use_unet: Callable[[], contextlib.AbstractContextManager] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @contextlib.contextmanager
    def unet(self) -> Iterator["torch.nn.Module"]:
        assert self._use_unet is not None, "model handle has no loader"
        with self._use_unet() as unet:
            yield unet

    def __kiln_nbytes__(self) -> int:
        return 0  # the model manager owns the weights


ConditioningValue = list  # [[embeds, {"pooled_output": ...}], ...]
