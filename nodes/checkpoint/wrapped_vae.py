"""The base of the VAEs Kiln puts behind the image-VAE surface a VAE handle uses (``config``, ``device``,
``dtype``, ``encode``/``decode``) where the wrapped diffusers VAE codes another layout: Qwen-Image's video VAE
one frame at a time (nodes.checkpoint.qwen_image_vae), HunyuanImage's refiner VAE in its stacked layout
(nodes.checkpoint.hunyuan_refiner_vae), HunyuanVideo 1.5's one frame at a time
(nodes.checkpoint.hunyuan_video15_load), FLUX.2's behind its patch latent (nodes.checkpoint.flux2_vae).
"""
from __future__ import annotations

import types
from typing import Any

import torch


class WrappedVAE(torch.nn.Module):
    """``vae`` held as a submodule (so the model manager moves and casts it), its config copied with
    ``changes`` (what the wrapper's own layout differs in), and its device and dtype read from its weights."""

    def __init__(self, vae: Any, **changes: Any) -> None:
        super().__init__()
        self.vae = vae
        self.config = types.SimpleNamespace(**{**dict(vae.config), **changes})

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


class OneFrameVAE(WrappedVAE):
    """A video VAE coding a picture [B, C, H, W] as a one-frame video; the frame axis is dropped from its
    latents and posterior. A family whose picture latent is laid out otherwise than the frame's (the HunyuanImage
    refiner stacks it) overrides the two layout hooks, so the coding itself lives here once."""

    def picture_latent(self, frame: torch.Tensor) -> torch.Tensor:
        """The picture latent of one frame's latent [B, C, h, w]: the same tensor unless a family lays it out."""
        return frame

    def frame_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The frame latent [B, C, h, w] the video VAE decodes from a picture latent (the inverse hook)."""
        return z

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        dist = self.vae.encode(x.unsqueeze(2)).latent_dist
        mean, std = (self.picture_latent(t[:, :, 0]) for t in (dist.mean, dist.std))
        flat = types.SimpleNamespace(
            mean=mean, std=std, mode=lambda: mean,
            sample=lambda generator=None: self.picture_latent(dist.sample(generator)[:, :, 0]))
        return types.SimpleNamespace(latent_dist=flat)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Any:
        frames = self.vae.decode(self.frame_latent(z).unsqueeze(2), return_dict=False)[0]
        return types.SimpleNamespace(sample=frames[:, :, 0])
