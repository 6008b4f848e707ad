"""What a transformer family checks of its inputs before running, worded alike for every family.

The patch-2 transformers (FLUX, Chroma, Qwen-Image, Z-Image) fold 2x2 latent pixels into a token, so
an odd latent cannot be patched (the families that take any size, as ComfyUI does, pad it to whole
patches by wrapping around instead: :func:`pad_to_patches`); every text-conditioned transformer reads
conditioning of one width, so a prompt encoded by another family's text encoder is refused naming the encoder it needs. The
checks and their messages are one rule, kept here once.
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import ConditioningError


def check_even_latent(label: str, h: int, w: int) -> None:
    """Refuse a latent of odd height or width (``label``: the family as the message names it)."""
    if h % 2 or w % 2:
        raise ConditioningError(f"a {label} latent needs an even size, got {h}x{w} (use multiples of 16 pixels)",
                                "latent_image")


def pad_to_patches(x: "Any", patch: int) -> "Any":
    """``x`` [..., h, w] padded at the bottom and right to whole ``patch`` x ``patch`` patches by wrapping
    around (ComfyUI's ``pad_to_patch_size``), for the families that take any size and crop the output back;
    ``x`` itself when it already fits."""
    import torch

    h, w = x.shape[-2:]
    bottom, right = -h % patch, -w % patch
    if not bottom and not right:
        return x
    return torch.nn.functional.pad(x, (0, right, 0, bottom), mode="circular")


def check_text_width(label: str, width: int, reads: int, encode_with: str) -> None:
    """Refuse conditioning ``width`` wide when the transformer ``reads`` another width; ``encode_with``:
    how to encode a prompt this family can read (the text encoder and its loader)."""
    if width != reads:
        raise ConditioningError(f"the conditioning is {width} wide but this {label} transformer reads {reads} "
                                f"({encode_with})", "positive")


def pooled_projections(extras: list[dict], batch: int, device: Any, dtype: Any, needs: str) -> "Any":
    """The call's pooled text [rows, width] from each conditioning's ``pooled_output`` (``batch`` rows each,
    in order), for the families whose network reads one (SD3, Kandinsky 5); a conditioning without it is
    refused naming its input, ``needs`` saying which model wants it and how to encode for it."""
    import torch

    pooled = []
    for extra in extras:
        p = extra.get("pooled_output")
        if p is None:
            raise ConditioningError(f"this {needs}", extra.get("_input", "positive"))
        pooled.append(p.reshape(1, -1).expand(batch, -1))
    return torch.cat(pooled).to(device=device, dtype=dtype)


def frame_height(label: str, folded_height: int, width: int, frames: int, latent: str, maker: str) -> int:
    """One frame's height of a folded latent (nodes.latent_layers: [B, C, frames * h, w]), refused when no
    frame count came with it or it does not divide (``latent``: what the family denoises, e.g. "a video
    latent [B, 16, frames, h, w]"; ``maker``: the node that makes one) or a frame's size is odd."""
    if not frames or folded_height % frames:
        raise ConditioningError(f"{label} denoises {latent}: start from {maker}", "latent_image")
    check_even_latent(label, folded_height // frames, width)
    return folded_height // frames
