"""The base of the VAEs Kiln puts behind the image-VAE surface a VAE handle uses (``config``, ``device``,
``dtype``, ``encode``/``decode``) where the wrapped diffusers VAE codes another layout: Qwen-Image's video VAE
one frame at a time (nodes.checkpoint.qwen_image_vae), HunyuanImage's refiner VAE in its stacked layout
(nodes.checkpoint.hunyuan_refiner_vae), FLUX.2's behind its patch latent (nodes.checkpoint.flux2_vae).
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
