"""What KSampler does with inpainting inputs before the loop runs.

Two independent mechanisms, as in ComfyUI:

* A LATENT's ``noise_mask`` (SetLatentNoiseMask, VAEEncodeForInpaint,
  InpaintModelConditioning) makes any checkpoint keep the unmasked region at the
  input at every step (:mod:`nodes.samplers.hold`).
* An inpainting checkpoint (``conv_in`` 2C+1 wide) gets its mask and masked-image
  channels from the conditioning's ``concat_latent_image``/``concat_mask``
  (InpaintModelConditioning), else from the noise mask and the input latent, else
  "repaint everything" (mask of ones, grey masked image) — ComfyUI's defaults,
  announced in a node message. The channels ride on the conditioning's extras for
  the family's ``extra_channels`` (:mod:`nodes.families.inpaint`).

The noise mask follows the mask size rule (nodes.masking) against the latent's
image size (8 pixels per latent pixel), then is resized bilinearly to the
latent, as ComfyUI does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from engine.context import NodeError
from nodes.families import inpaint
from nodes.masking import fit_mask, is_empty

#: Pixels per latent pixel of every SD VAE.
DOWNSCALE = 8


@dataclass
class Prepared:
    positive: Any
    negative: Any
    #: latent-size noise mask [B, 1, h, w] (None: no noise mask)
    mask: Any = None
    #: True when the noise mask marks nothing: there is nothing to repaint
    nothing_to_repaint: bool = False
    #: DualCFGGuider's second prompt (cond2), prepared as the others; None without one
    middle: Any = None


def _latent_mask(mask: Any, size: tuple[int, int], batch: int, input_name: str,
                 message: Callable[[str], None], what: str) -> Any:
    """A pixel-size mask (any of ComfyUI's shapes) at latent ``size`` [batch, 1, h, w] (bilinear)."""
    import torch
    import torch.nn.functional as F

    from nodes.masking import repeat_to_batch

    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3, 4):
        raise NodeError(f"{what} must be a mask tensor [batch, height, width], got {type(mask).__name__}", input_name)
    mask = mask.to(torch.float32).reshape(-1, mask.shape[-2], mask.shape[-1])
    h, w = size
    mask = fit_mask(mask, h * DOWNSCALE, w * DOWNSCALE, input_name, message,
                    target=f"the latent's image ({w * DOWNSCALE}x{h * DOWNSCALE})")
    mask = F.interpolate(mask.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
    return repeat_to_batch(mask.clamp(0, 1), batch)


def _with_concat(cond: Any, concat_for: Callable[[dict], Any]) -> Any:
    """A copy of a CONDITIONING with each entry's inpaint channels in its extras."""
    return [[embeds, {**extra, inpaint.CONCAT_KEY: concat_for(extra)}] for embeds, extra in cond]


def in_channels(model: Any) -> int:
    """A UNet's ``conv_in`` width; the latent's channels for networks without one (a
    transformer such as Flux packs its input its own way, which is its family's business)."""
    conv_in = getattr(model.peek(), "conv_in", None)
    return int(getattr(conv_in, "in_channels", None) or model.latent.channels)


def prepare(model: Any, positive: Any, negative: Any, latent_image: dict, x0: Any,
            message: Callable[[str], None], middle: Any = None, middle_name: str = "cond2") -> Prepared:
    """Check the inpainting inputs against the model and make them ready for the loop.

    ``x0``: the input latent in model space [B, C, h, w]; ``middle``: a third conditioning
    (DualCFGGuider's cond2, PerpNeg's empty prompt) that gets the same treatment, errors about
    it naming ``middle_name``.
    """
    import torch

    batch, channels, h, w = x0.shape
    raw_mask = latent_image.get("noise_mask")
    mask = None
    if raw_mask is not None:
        mask = _latent_mask(raw_mask, (h, w), batch, "latent_image", message, "the latent's noise_mask")
        if is_empty(mask):
            message("the noise mask is empty: nothing to repaint, so the latent is returned unchanged")
            return Prepared(positive, negative, mask, nothing_to_repaint=True, middle=middle)

    width = in_channels(model)
    if width == channels:  # a plain model: InpaintModelConditioning's channels are not for it (ComfyUI too)
        return Prepared(positive, negative, mask, middle=middle)
    if inpaint.is_instruct_pix2pix(width, channels):
        return _instruct_pix2pix(positive, negative, middle, mask, x0, message)
    if not inpaint.is_inpainting(width, channels):
        raise NodeError(f"the model's network takes {width} input channels; Kiln knows {channels} (plain), "
                        f"{2 * channels} (InstructPix2Pix) and {2 * channels + 1} (inpainting) for "
                        f"{channels}-channel latents", "model")
    carries = any(isinstance(c, list) and any("concat_latent_image" in e[1] for e in c)
                  for c in (positive, negative, middle))
    if not carries and mask is None:
        message(f"this is an inpainting model ({width} input channels) but nothing says what to keep: it "
                "repaints the whole image (mask of ones, grey masked image), as ComfyUI does. Use "
                "VAEEncodeForInpaint or InpaintModelConditioning to repaint a region")

    def concat_for(input_name: str) -> Callable[[dict], Any]:
        def build(extra: dict) -> Any:
            given = extra.get("concat_latent_image")
            own_mask = extra.get("concat_mask")
            m = mask if own_mask is None else _latent_mask(own_mask, (h, w), batch, input_name, message,
                                                           "the conditioning's concat_mask")
            if m is None:
                return torch.cat([torch.ones_like(x0[:, :1]), inpaint.blank_latent_like(x0)], dim=1)
            if given is None:
                image = x0
            else:
                image = _concat_latent(model, given, x0, input_name)
            return torch.cat([m.round(), image], dim=1)
        return build

    def side(cond: Any, input_name: str) -> Any:
        return _with_concat(cond, concat_for(input_name)) if isinstance(cond, list) else cond

    return Prepared(_with_concat(positive, concat_for("positive")), side(negative, "negative"), mask,
                    middle=side(middle, middle_name))


def _concat_latent(model: Any, given: Any, x0: Any, input_name: str) -> Any:
    """InpaintModelConditioning's masked-image latent (raw VAE space) in model space, checked."""
    import torch

    from nodes.masking import repeat_to_batch

    if not isinstance(given, torch.Tensor) or given.ndim != 4:
        raise NodeError("the conditioning's concat_latent_image must be a latent [B, C, h, w]", input_name)
    if given.shape[1] != x0.shape[1] or given.shape[2:] != x0.shape[2:]:
        raise NodeError(f"the inpaint conditioning's image latent is {tuple(given.shape[1:])} (channels, h, w) but "
                        f"the latent being sampled is {tuple(x0.shape[1:])}: encode the same image at the same "
                        "size with this model's VAE", input_name)
    return repeat_to_batch(model.latent.to_model(given.to(torch.float32)), x0.shape[0])


def _instruct_pix2pix(positive: Any, negative: Any, middle: Any, mask: Any, x0: Any,
                      message: Callable[[str], None]) -> Prepared:
    """An InstructPix2Pix model's extra channels: each conditioning's ``concat_latent_image``
    (InstructPixToPixConditioning's, raw VAE space as the model was trained on), zeros for one
    without it (ComfyUI's rule: the model then edits nothing in particular)."""
    import torch

    from nodes.masking import repeat_to_batch

    def side(cond: Any, input_name: str) -> Any:
        if not isinstance(cond, list):
            return cond

        def concat_for(extra: dict) -> Any:
            given = extra.get("concat_latent_image")
            if given is None:
                return torch.zeros_like(x0)
            if not isinstance(given, torch.Tensor) or given.ndim != 4 or given.shape[1] != x0.shape[1]:
                raise NodeError(f"the conditioning's image latent is {tuple(getattr(given, 'shape', ()))} but the "
                                f"latent being sampled has {x0.shape[1]} channels: encode the image with this "
                                "model's VAE (InstructPixToPixConditioning)", input_name)
            given = given.to(torch.float32)
            if given.shape[2:] != x0.shape[2:]:  # ComfyUI's rule: fit it to the latent being sampled
                from nodes.resample import resize

                given = resize(given, x0.shape[3], x0.shape[2], "bilinear", crop="center")
            return repeat_to_batch(given, x0.shape[0])
        return _with_concat(cond, concat_for)

    if not any(isinstance(c, list) and any("concat_latent_image" in e[1] for e in c)
               for c in (positive, negative, middle)):
        message("this is an InstructPix2Pix model (8 input channels) but no conditioning carries the image to "
                "edit: use InstructPixToPixConditioning")
    return Prepared(side(positive, "positive"), side(negative, "negative"), mask, middle=side(middle, "cond2"))
