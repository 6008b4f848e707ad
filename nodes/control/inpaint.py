"""Inpainting ControlNets with a mask channel (AliMama's for SD3 and FLUX.1, InstantX's for Qwen-Image).

Such a ControlNet reads, besides the latent, a hint of the latent's channels plus one: the
VAE latent of the image with the area to repaint blacked out, and the mask of what is kept
(1 keep, 0 repaint) at the latent's size. As ComfyUI's ControlNetInpaintingAliMamaApply
builds it: the mask is inverted into a "kept" mask, the image is multiplied by that mask
(resized bilinearly to the image and rounded, so only whole pixels are blacked out), and the
kept mask itself, at its own size, is resized to the latent (nearest-exact, centre crop, the
hint's rule) when the ControlNet runs. Given no mask (ControlNetApplyAdvanced, which ComfyUI
allows for these), the kept mask is all ones: nothing is repainted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.context import NodeError

if TYPE_CHECKING:
    import torch

#: The extra hint channels an inpainting ControlNet reads: the mask.
MASK_CHANNELS = 1
#: Where a FLUX ControlNet's config notes its extra hint channels (diffusers' FLUX config has no such entry).
FLUX_EXTRA = "kiln_extra_condition_channels"
#: diffusers' QwenImageControlNetModel counts its extra inputs after 2x2 packing: 4 per latent channel.
QWEN_EXTRA, QWEN_PATCH = "extra_condition_channels", 4


def extra_channels(config: Any) -> int:
    """How many channels beyond the latent's the ControlNet's hint has (0: not an inpainting one)."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    return int(get("extra_conditioning_channels", 0) or get(FLUX_EXTRA, 0) or 0) \
        or int(get(QWEN_EXTRA, 0) or 0) // QWEN_PATCH


def masked_image(image: "torch.Tensor", mask: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(the IMAGE with the masked pixels black, the kept mask [B, 1, h, w] at the mask's size),
    ComfyUI's rule; ``mask`` is a MASK [B, h, w] where 1 marks what to repaint."""
    from nodes.resample import resize

    kept = 1.0 - mask.to(image.dtype).reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if kept.shape[0] != image.shape[0] and 1 not in (kept.shape[0], image.shape[0]):
        raise NodeError(f"the mask has {kept.shape[0]} items and the image {image.shape[0]}: give one mask or one "
                        "per image", "mask")
    keep = resize(kept, image.shape[2], image.shape[1], "bilinear", "center").round()
    return image * keep.movedim(1, -1), kept


def ones() -> "torch.Tensor":
    """The kept mask of an inpainting ControlNet applied without one: keep everything."""
    import torch

    return torch.ones(1, 1, 1, 1)


def mask_latent(link: Any, rows: int, h: int, w: int, method: str = "nearest-exact") -> "torch.Tensor":
    """The link's kept mask at the latent's size ``h`` x ``w``, one per row (cached per size and
    ``method``: ComfyUI's nearest-exact, or the plain nearest of diffusers' Qwen-Image pipeline)."""
    from nodes.control.apply import to_rows
    from nodes.resample import resize

    key = ("kept-mask", h, w, method)
    if key not in link.cache:
        kept = link.mask if link.mask is not None else ones()
        link.cache[key] = resize(kept.to(link.hint.device), w, h, method, "center")
    return to_rows(link.cache[key], rows)


def with_mask(link: Any, hint: "torch.Tensor", channels: int, method: str = "nearest-exact") -> "torch.Tensor":
    """The latent hint [B, C, h, w] with the kept mask appended (resized by ``method``), when the
    ControlNet reads one."""
    import torch

    if not channels:
        return hint
    if channels != MASK_CHANNELS:
        from nodes.families.base import ConditioningError

        raise ConditioningError(f"the ControlNet {link.net.name!r} reads {channels} extra hint channels; only a "
                                "one-channel mask is known", "positive")
    mask = mask_latent(link, hint.shape[0], hint.shape[2], hint.shape[3], method)
    return torch.cat([hint, mask.to(hint.device, hint.dtype)], dim=1)
