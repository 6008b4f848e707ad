"""The FLUX.2 VAE as Kiln's VAE nodes use it: IMAGE <-> the 128-channel patch latent.

diffusers' ``AutoencoderKLFlux2`` encodes to 32 channels at 1/8 of the image and keeps, in a
BatchNorm2d without affine weights (``bn``), the running mean and variance of its 2x2-patchified
latents. Flux2KleinPipeline patchifies and normalises by them after encoding (``(z - mean) /
sqrt(var + eps)``) and undoes both before decoding; ComfyUI does the same inside its VAE. This
module wraps the diffusers VAE (on nodes.checkpoint.wrapped_vae.WrappedVAE) so ``encode``/``decode``
speak that latent, as every VAE node expects of a VAE module (``.encode(x).latent_dist``,
``.decode(z).sample``, ``config.latent_channels``).
Loading (the original ``flux2-vae.safetensors`` layout, a diffusers folder) is in
:mod:`nodes.checkpoint.flux2_load`.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from nodes.checkpoint.wrapped_vae import WrappedVAE
from nodes.families.flux2 import DOWNSCALE, FLUX2_LATENT


def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], each channel's 2x2 patch in row order (the pipelines' rule)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    b, c, h, w = z.shape
    z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // 4, h * 2, w * 2)


class Flux2LatentVAE(WrappedVAE):
    """``AutoencoderKLFlux2`` (``vae``) behind the patch latent (see the module docstring)."""

    #: What VAE handles read for the pixel multiple (VaeHandle.downscale).
    kiln_downscale = DOWNSCALE

    def __init__(self, vae: Any) -> None:
        super().__init__(vae, latent_channels=FLUX2_LATENT.channels, scaling_factor=FLUX2_LATENT.scale,
                         shift_factor=None)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        """The posterior over the normalised patch latent: its mean and spread (``latent_dist``)."""
        dist = self.vae.encode(x).latent_dist
        mean = patchify(dist.mean)
        bn_mean, bn_std = self._stats(mean)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=(mean - bn_mean) / bn_std,
                                                           std=patchify(dist.std) / bn_std))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        bn_mean, bn_std = self._stats(z)
        return SimpleNamespace(sample=self.vae.decode(unpatchify(z * bn_std + bn_mean)).sample)
