"""Inpainting nodes with ComfyUI's names, inputs and outputs.

* ``SetLatentNoiseMask``: any checkpoint repaints only the masked region; the
  rest is held to the input at every step (nodes.samplers.hold).
* ``VAEEncodeForInpaint``: the masked pixels go to grey before encoding (what a
  dedicated inpainting model expects), and the mask, grown by ``grow_mask_by``
  pixels so the repaint blends across the border, becomes the noise mask.
* ``InpaintModelConditioning``: the grey-masked image's latent and the mask go
  on both conditionings (``concat_latent_image``/``concat_mask``, ComfyUI's keys)
  for an inpainting checkpoint's extra channels; the latent is the untouched
  image, with the mask as noise mask unless ``noise_mask`` is off.

Masks follow the mask size rule (nodes.masking.fit_mask); an empty mask is not an
error but the node says there is nothing to repaint. Images whose sides are not
multiples of 8 are resized to the nearest multiples (VAEEncode's default rule,
nodes.vae), the mask with them, and the node says so: nothing is cropped.
"""
from __future__ import annotations

import math
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.masking import as_image, as_mask, fit_mask, is_empty, repeat_to_batch

NOTHING_TO_REPAINT = "the mask is empty: nothing to repaint (the image is kept as it is)"


def _mask_for(ctx, mask: Any, pixels: Any) -> Any:
    """The mask [B, H, W] at the image's size by the mask size rule, with the empty-mask message."""
    mask = as_mask(mask)
    _, h, w, _ = pixels.shape
    mask = fit_mask(mask, h, w, "mask", ctx.message)
    if is_empty(mask):
        ctx.message(NOTHING_TO_REPAINT)
    return mask


def _to_vae_size(ctx, pixels: Any, mask: Any, vae: Any) -> tuple[Any, Any]:
    """Pixels and mask at sides that are multiples of the VAE's factor (resized together)."""
    import torch.nn.functional as F

    from nodes.vae import fit_to_multiple

    pixels, done = fit_to_multiple(pixels.float(), vae.downscale, "resize")
    if done:
        ctx.message(done + "; the mask with it")
        mask = F.interpolate(mask.unsqueeze(1), size=pixels.shape[1:3], mode="bilinear",
                             align_corners=False).squeeze(1)
    return pixels, mask


def grey_out(pixels: Any, mask: Any) -> Any:
    """The image with every pixel the rounded mask marks set to 0.5 grey (VAE input 0)."""
    keep = (1.0 - mask.round()).unsqueeze(-1)
    return (pixels[..., :3] - 0.5) * keep + 0.5


def grow(mask: Any, by: int) -> Any:
    """The rounded mask grown by a ``by`` x ``by`` square (ComfyUI's VAEEncodeForInpaint growth)."""
    import torch
    import torch.nn.functional as F

    if by <= 0:
        return mask.round()
    kernel = torch.ones((1, 1, by, by), dtype=mask.dtype)
    pad = math.ceil((by - 1) / 2)
    grown = F.conv2d(mask.round().unsqueeze(1), kernel, padding=pad).clamp(0, 1)
    return grown[:, 0, :mask.shape[1], :mask.shape[2]]


def _checks(pixels: Any, vae: Any) -> Any:
    from nodes.vae import MIN_SIDE, _check_vae

    _check_vae(vae)
    pixels = as_image(pixels, "pixels")
    if pixels.shape[1] < MIN_SIDE or pixels.shape[2] < MIN_SIDE:
        raise NodeError(f"the image is {pixels.shape[2]}x{pixels.shape[1]}; at least {MIN_SIDE}x{MIN_SIDE} pixels "
                        "are needed", "pixels")
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(*pixels.shape[:3], 3)
    return pixels


@define_node(
    "SetLatentNoiseMask",
    category="latent/inpaint",
    display_name="Set Latent Noise Mask",
    inputs=[Input("samples", T.LATENT), Input("mask", T.MASK)],
    outputs=[Output("LATENT", T.LATENT)],
)
def set_latent_noise_mask(ctx, samples: Any, mask: Any):
    """Repaint only the masked region (1 = repaint) with any checkpoint; the rest stays the input.

    The mask is checked against the latent's image size (8 pixels per latent pixel)
    by the mask size rule; KSampler resizes it to the latent bilinearly."""
    import torch

    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise NodeError("expected a LATENT (a dict with 'samples')", "samples")
    latent = samples["samples"]
    if latent.ndim != 4:
        raise NodeError(f"latent samples must be [B, C, h, w], got shape {tuple(latent.shape)}", "samples")
    mask = as_mask(mask)
    h, w = latent.shape[2] * 8, latent.shape[3] * 8
    mask = fit_mask(mask, h, w, "mask", ctx.message, target=f"the latent's image ({w}x{h})")
    if is_empty(mask):
        ctx.message(NOTHING_TO_REPAINT)
    out = dict(samples)
    out["noise_mask"] = mask.unsqueeze(1)
    return (out,)


@define_node(
    "VAEEncodeForInpaint",
    category="latent/inpaint",
    display_name="VAE Encode (for Inpainting)",
    inputs=[
        Input("pixels", T.IMAGE),
        Input("vae", T.VAE),
        Input("mask", T.MASK),
        Input("grow_mask_by", T.INT, default=6, min=0, max=64, step=1,
              tooltip="Grow the repainted region by this many pixels so it blends across the border"),
    ],
    outputs=[Output("LATENT", T.LATENT)],
)
def vae_encode_for_inpaint(ctx, pixels: Any, vae: Any, mask: Any, grow_mask_by: int = 6):
    """Encode with the masked region grey, and make the grown mask the noise mask.

    Grey under the mask is what inpainting checkpoints were trained on; with an
    ordinary checkpoint use SetLatentNoiseMask on VAEEncode instead (the grey
    would show through at low strength)."""
    pixels = _checks(pixels, vae)
    mask = _mask_for(ctx, mask, pixels)
    pixels, mask = _to_vae_size(ctx, pixels, mask, vae)
    mask = repeat_to_batch(mask, pixels.shape[0])
    if not 0 <= int(grow_mask_by) <= 64:
        raise NodeError(f"grow_mask_by must be within 0..64, got {grow_mask_by}", "grow_mask_by")
    samples = vae.encode(grey_out(pixels, mask))
    return ({"samples": samples, "noise_mask": grow(mask, int(grow_mask_by)).unsqueeze(1)},)


@define_node(
    "InpaintModelConditioning",
    category="conditioning/inpaint",
    display_name="InpaintModelConditioning",
    inputs=[
        Input("positive", T.CONDITIONING),
        Input("negative", T.CONDITIONING),
        Input("vae", T.VAE),
        Input("pixels", T.IMAGE),
        Input("mask", T.MASK),
        Input("noise_mask", T.BOOLEAN, default=True,
              tooltip="Also hold the unmasked region to the image while sampling. Off: the inpainting "
                      "model alone decides, which can blend better but may change the rest slightly."),
    ],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING), Output("latent", T.LATENT)],
)
def inpaint_model_conditioning(ctx, positive: Any, negative: Any, vae: Any, pixels: Any, mask: Any,
                               noise_mask: bool = True):
    """Give an inpainting checkpoint its extra inputs: the mask and the grey-masked image's latent."""
    from nodes.conditioning_nodes import _entries

    pos, neg = _entries(positive, "positive"), _entries(negative, "negative")
    pixels = _checks(pixels, vae)
    mask = _mask_for(ctx, mask, pixels)
    pixels, mask = _to_vae_size(ctx, pixels, mask, vae)
    mask = repeat_to_batch(mask, pixels.shape[0])
    concat = vae.encode(grey_out(pixels, mask))
    latent = {"samples": vae.encode(pixels[..., :3])}
    if noise_mask:
        latent["noise_mask"] = mask.unsqueeze(1)
    keys = {"concat_latent_image": concat, "concat_mask": mask.unsqueeze(1)}
    return ([[e, {**x, **keys}] for e, x in pos], [[e, {**x, **keys}] for e, x in neg], latent)


@define_node(
    "InstructPixToPixConditioning",
    category="conditioning/instructpix2pix",
    inputs=[Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING), Input("vae", T.VAE),
            Input("pixels", T.IMAGE)],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING), Output("latent", T.LATENT)],
)
def instruct_pix_to_pix_conditioning(ctx, positive: Any, negative: Any, vae: Any, pixels: Any):
    """Give an InstructPix2Pix checkpoint the image to edit: its latent on both conditionings
    (``concat_latent_image``), and an empty latent of its size to sample from. As ComfyUI's, an
    image whose sides are not multiples of 8 is centre-cropped to them."""
    import torch

    from nodes.conditioning_nodes import _entries

    pos, neg = _entries(positive, "positive"), _entries(negative, "negative")
    pixels = _checks(pixels, vae)
    h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
    if (h, w) != tuple(pixels.shape[1:3]):
        top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, top:top + h, left:left + w]
        ctx.message(f"the image is cropped to {w}x{h}, multiples of 8")
    concat = vae.encode(pixels[..., :3])
    keys = {"concat_latent_image": concat}
    return ([[e, {**x, **keys}] for e, x in pos], [[e, {**x, **keys}] for e, x in neg],
            {"samples": torch.zeros_like(concat)})
