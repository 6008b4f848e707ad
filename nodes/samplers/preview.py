"""A cheap look at a latent while it is being sampled.

Decoding with the VAE every step would cost more than the step itself (the VAE
decoder dominates a step's time at 512 px on a CPU). Instead each latent channel
is mapped to RGB by the family's fixed linear projection
(:meth:`nodes.families.base.LatentFormat.preview_rgb`). The result is a small image
at latent resolution, good enough to watch composition and colour emerge.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from nodes.families.base import LatentFormat

#: Previews are at most this many pixels on the long side.
MAX_PREVIEW_SIDE = 256


def make_preview(latent: "torch.Tensor", fmt: "LatentFormat") -> Any:
    """An ``engine.events.Preview`` (JPEG) of batch item 0 of a model-space latent [B,C,h,w]."""
    import io

    from PIL import Image

    from engine.events import Preview

    pixels = fmt.preview_rgb(latent[0]).numpy()
    image = Image.fromarray(pixels, "RGB")
    side = max(image.size)
    if side > MAX_PREVIEW_SIDE:
        scale = MAX_PREVIEW_SIDE / side
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return Preview(data=buf.getvalue(), mime="image/jpeg", width=image.width, height=image.height)
