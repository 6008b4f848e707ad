"""Inpainting (and InstructPix2Pix) checkpoints' extra input channels, for every SD-style family.

A dedicated inpainting UNet (SD 1.5 inpainting, SDXL inpainting) takes the
latent plus ``1 + C`` more channels: the mask at latent size (1 = repaint) and
the latent of the image with the masked region grey, in the model's latent
space — diffusers' and ComfyUI's order ``[latent, mask, masked latent]``. It is
recognised by its ``conv_in`` width alone (``in_channels == 2 * C + 1``).

KSampler's preparation (:mod:`nodes.inpaint_sampling`) puts the ready channels on
each conditioning's extras under :data:`CONCAT_KEY`; the family's
:meth:`~nodes.families.base.Family.extra_channels` appends them here, so the
sampling loop and the guidance never know a model is an inpainting one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Extras key holding [1 or B, 1 + C, h, w] model-space channels to append to the network input.
CONCAT_KEY = "_inpaint_concat"


def is_inpainting(in_channels: int, latent_channels: int) -> bool:
    """Whether a network with this input width is an inpainting one for this latent space."""
    return in_channels == 2 * latent_channels + 1


def is_instruct_pix2pix(in_channels: int, latent_channels: int) -> bool:
    """Whether a network with this input width is an InstructPix2Pix one (latent + the image to
    edit's latent, raw VAE space: diffusers' and ComfyUI's SD 1.5 InstructPix2Pix)."""
    return in_channels == 2 * latent_channels


def append(x: "torch.Tensor", extras: list[dict]) -> "torch.Tensor":
    """``x`` with each conditioning's inpaint channels appended (unchanged when none carries them).

    ``extras`` has one dict per conditioning in the batch's order, each for
    ``len(x) / len(extras)`` consecutive rows (the denoiser's convention). A
    conditioning cropped to an area gets the same crop of its channels.
    """
    import torch

    if not extras or not any(CONCAT_KEY in e for e in extras):
        return x
    rows = x.shape[0] // len(extras)
    parts = []
    for extra in extras:
        concat = extra[CONCAT_KEY].to(device=x.device, dtype=x.dtype)
        if concat.shape[2:] != x.shape[2:]:  # an area conditioning: the network sees only its crop
            from nodes.families.conditioning import area_of

            ah, aw, ay, ax = area_of(extra, concat.shape[2], concat.shape[3]) or (0, 0, 0, 0)
            concat = concat[:, :, ay:ay + ah, ax:ax + aw]
        if concat.shape[0] != rows:
            concat = concat.repeat(-(-rows // concat.shape[0]), 1, 1, 1)[:rows]
        parts.append(concat)
    return torch.cat([x, torch.cat(parts)], dim=1)


#: A grey (pixel value 0.5) image in the SD VAEs' model-space latent: what an inpainting
#: model sees as its masked image when nothing says what to keep (ComfyUI's constants).
BLANK_SD_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def blank_latent_like(x: "torch.Tensor") -> "torch.Tensor":
    """The masked-image channels for "repaint everything": grey for 4-channel latents, else zeros."""
    import torch

    if x.shape[1] != len(BLANK_SD_LATENT):
        return torch.zeros_like(x)
    return torch.tensor(BLANK_SD_LATENT, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand_as(x).clone()
