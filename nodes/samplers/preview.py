"""A cheap look at a latent while it is being sampled.

Decoding with the VAE every step would cost more than the step itself (the VAE
decoder dominates a step's time at 512 px on a CPU). Instead each of the 4 latent
channels is mapped to RGB by a fixed linear projection (per model family), fitted
once by the community against real VAE decodes; ComfyUI and A1111 ship the same
kind of table ("latent2rgb"). The result is a small image at latent resolution,
good enough to watch composition and colour emerge.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Rows: latent channels; columns: R, G, B. For *scaled* latents (model space).
_SD1_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

#: Previews are at most this many pixels on the long side.
MAX_PREVIEW_SIDE = 256


def latent_to_rgb(latent: "torch.Tensor", family: str) -> "torch.Tensor":
    """[C,h,w] scaled latent -> [h,w,3] uint8 via the family's linear projection."""
    import torch

    factors = _SDXL_FACTORS if family == "sdxl" else _SD1_FACTORS
    weight = torch.tensor(factors, dtype=torch.float32)
    lat = latent.detach().to("cpu", torch.float32)
    if lat.shape[0] != weight.shape[0]:  # an unknown latent layout: show the first channels as grey
        grey = lat[:1].expand(3, -1, -1).permute(1, 2, 0)
        return ((grey + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    rgb = lat.permute(1, 2, 0) @ weight
    if family == "sdxl":
        rgb = rgb + torch.tensor(_SDXL_BIAS)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def make_preview(latent: "torch.Tensor", family: str) -> Any:
    """An ``engine.events.Preview`` (JPEG) of batch item 0 of a scaled latent [B,C,h,w]."""
    import io

    from PIL import Image

    from engine.events import Preview

    pixels = latent_to_rgb(latent[0], family).numpy()
    image = Image.fromarray(pixels, "RGB")
    side = max(image.size)
    if side > MAX_PREVIEW_SIDE:
        scale = MAX_PREVIEW_SIDE / side
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return Preview(data=buf.getvalue(), mime="image/jpeg", width=image.width, height=image.height)
