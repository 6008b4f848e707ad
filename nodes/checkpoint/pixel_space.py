"""VAELoader's ``pixel_space``: the pass-through "VAE" of pixel-space models (Chroma1-Radiance).

ComfyUI lists ``pixel_space`` among VAELoader's choices for models whose latent is the image: encoding
maps an IMAGE's 0..1 values to -1..1 and decoding maps back and clamps, nothing else. Kiln's VaeHandle does
exactly that scaling around its module's encode and decode (nodes.handles.VaeHandle), so the module here is
the identity in diffusers' AutoencoderKL calling shape (``encode(x).latent_dist``, ``decode(z).sample``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

#: VAELoader's choice (ComfyUI's name).
NAME = "pixel_space"


class _Posterior:
    """A point posterior at the pixels (mean = the pixels, std = 0)."""

    def __init__(self, x: Any) -> None:
        import torch

        self.mean, self.std = x, torch.zeros_like(x)

    def sample(self, generator: Any = None) -> Any:
        return self.mean

    def mode(self) -> Any:
        return self.mean


class PixelSpaceVAE:
    """The identity with AutoencoderKL's encode/decode shape; 3 channels, one pixel a cell."""

    kiln_downscale = 1
    config = SimpleNamespace(latent_channels=3, scaling_factor=1.0, shift_factor=None)

    def __init__(self) -> None:
        import torch

        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode(self, x: Any) -> Any:
        return SimpleNamespace(latent_dist=_Posterior(x))

    def decode(self, z: Any) -> Any:
        return SimpleNamespace(sample=z)

    def eval(self) -> "PixelSpaceVAE":
        return self


def handle() -> Any:
    """VAELoader's VAE handle for ``pixel_space``."""
    import contextlib

    from nodes.handles import VaeHandle

    module = PixelSpaceVAE()
    return VaeHandle(latent_scale=1.0, _use_vae=lambda: contextlib.nullcontext(module), name=NAME,
                     latent_channels=3, downscale=1)
