"""HiDream-E1 (E1-Full, E1.1): HiDream-I1's transformer fine-tuned for instruction editing.

The released E1 files are HiDream-I1 transformers key for key and shape for shape, so nothing in a file
tells E1 from I1 (ComfyUI's model detection gives both one config); what makes a call an edit is the
conditioning. ComfyUI's templates (``hidream_e1_full``, ``hidream_e1_1``) put the source picture on both
prompts with InstructPixToPixConditioning (``concat_latent_image``: the VAE's raw latent), and ComfyUI's
HiDream model then, as this module does:

* takes the source latent into model space (the FLUX latent format's scale and shift) and repeats it to
  the batch;
* sets it **beside** the latent being denoised, along the width (``[noisy | source]``), patches the
  joined latent as one picture: positions (0, row, column) over the whole joined grid, so the source's
  columns continue where the picture's end, every token attended to (no padding to the transformer's
  ``max_seq``, which diffusers' own patchify does for a non-square latent: its padded keys are zeroed,
  not masked, and the joined grid of a 1024-pixel edit is past ``max_seq``);
* keeps the output's first ``w`` columns: the prediction for the picture being made.

A latent side of odd length (InstructPixToPixConditioning crops pictures to multiples of 8 pixels, not 16)
is padded to whole patches by wrapping around, ComfyUI's ``pad_to_patch_size`` rule, for the edit's
joined latent and the plain picture alike (nodes.families.input_checks.pad_to_patches), and the output is cropped back; with an odd
width the joined latent is even, and the source's first column shares patches with the picture's last.

A conditioning without ``concat_latent_image`` (the DualCFGGuider negative in both templates: the bare
prompt) is an ordinary I1 call on the picture alone. Prompts with the source and without it cannot share
a network call (their token counts differ): :func:`call_key` keeps them apart.
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from nodes.families.base import ConditioningError, LatentFormat
from nodes.families.input_checks import pad_to_patches

#: InstructPixToPixConditioning's key (ComfyUI's name).
CONCAT = "concat_latent_image"
#: The network keyword the source latent travels under (ComfyUI's HiDream model's name).
IMAGE_COND = "image_cond"


def call_key(extra: dict) -> Hashable:
    """Conditionings evaluated in one call must carry the same source latent (the same object)."""
    image = extra.get(CONCAT)
    return None if image is None else id(image)


def network_kwargs(extras: list[dict], rows_each: int, latent: LatentFormat, device: Any,
                   dtype: Any) -> dict[str, Any]:
    """``{"image_cond": [rows, C, h, w]}`` (model space, each conditioning's rows) for a call over
    ``extras`` that share a :func:`call_key`; {} when they carry no source."""
    import torch

    from nodes.masking import repeat_to_batch

    first = extras[0]
    image = first.get(CONCAT)
    if image is None:
        return {}
    name = first.get("_input", "positive")
    if getattr(image, "ndim", None) != 4 or image.shape[1] != latent.channels:
        raise ConditioningError(f"the source image's latent has shape {list(getattr(image, 'shape', ()))}; HiDream-E1 "
                                f"reads [batch, {latent.channels}, h, w] latents: encode the picture with this "
                                "model's VAE (InstructPixToPixConditioning)", name)
    one = repeat_to_batch(latent.to_model(image.to(torch.float32)), rows_each)
    return {IMAGE_COND: torch.cat([one] * len(extras)).to(device=device, dtype=dtype)}


def joined_tokens(x: "Any", image_cond: "Any", patch: int) -> tuple["Any", "Any", list[tuple[int, int]]]:
    """The picture ``x`` [B, C, h, w] and its source latent side by side, cut into ``patch`` x ``patch``
    patches: tokens [B, n, patch * patch * C] (features ordered row-in-patch, column-in-patch, channel,
    as the transformer's own patchify orders them), positions [B, n, 3] (0, row, column) over the joined
    grid (padded to whole patches: input_checks.pad_to_patches), and the grid's size per row of the batch (what the
    transformer unpatches by)."""
    import torch

    b, c, h, w = x.shape
    if image_cond.shape[-2] != h:
        raise ConditioningError(f"the source image's latent is {image_cond.shape[-2]} high but the picture being "
                                f"made is {h}: sample InstructPixToPixConditioning's own latent", "positive")
    joined = pad_to_patches(torch.cat([x, image_cond.to(x)], dim=-1), patch)
    rows, cols = joined.shape[-2] // patch, joined.shape[-1] // patch
    tokens = joined.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, -1)
    ids = torch.zeros(rows, cols, 3, device=x.device)
    ids[..., 1] += torch.arange(rows, device=x.device)[:, None]
    ids[..., 2] += torch.arange(cols, device=x.device)[None, :]
    return tokens, ids.reshape(1, rows * cols, 3).expand(b, -1, -1), [(rows, cols)] * b
