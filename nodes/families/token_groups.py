"""A cross-job batch whose prompts have different token counts: one network call per count.

A prompt longer than one 77-token window is encoded window by window, so its
context is 154 or 231 tokens long while a short prompt's is 77. Stacking such
contexts in one tensor needs padding (which changes what attention averages over)
or repeating up to a common multiple (equal only in exact arithmetic, and not at
all under FLUX's joint attention). Instead the denoiser splits the batch: the rows
whose contexts have the same length make one network call with exactly the
context of their single runs, and the outputs are put back in the batch's order.
The sampler's state (latents, generators, scheduler) stays one batch; only the
network evaluation is split, so jobs with short prompts still share one call and
a long-prompt job runs beside them in the same step.

Within one job the positive and negative are matched first where that is cheap
(conditioning.match_tokens, as in that job's single run); lengths it leaves apart (a
FLUX prompt with Redux tokens beside one without) are split here like two jobs' prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from nodes.families.base import Family


@dataclass
class Group:
    """The rows of the batch (indices, on the compute device) that share one network call."""

    rows: "torch.Tensor"
    context: "torch.Tensor"
    kwargs: dict
    extras: list[dict]


def split(blocks: list["torch.Tensor"], extras: list[dict], per_block: int, family: "Family",
          image_size: tuple[int, int], device: Any, dtype: Any) -> list[Group] | None:
    """Groups of equal context length and call key (Family.call_key: FLUX's reference latents,
    which lengthen the image's token sequence) over ``blocks`` (one [1, tokens, dim] context per
    conditioning, each covering ``per_block`` consecutive rows of the batch, with its ``extras``);
    None when all blocks can share one call (the usual path)."""
    import torch

    keys = [(block.shape[1], family.call_key(extra)) for block, extra in zip(blocks, extras)]
    if len(set(keys)) <= 1:
        return None
    groups = []
    for key in dict.fromkeys(keys):
        members = [k for k, other in enumerate(keys) if other == key]
        rows = torch.cat([torch.arange(k * per_block, (k + 1) * per_block) for k in members]).to(device)
        context = torch.cat([blocks[k].expand(per_block, -1, -1) for k in members]).to(device=device, dtype=dtype)
        own = [extras[k] for k in members]
        groups.append(Group(rows, context, family.network_kwargs(own, per_block, image_size, device, dtype), own))
    return groups


def evaluate(call: Any, groups: list[Group], x: "torch.Tensor", t: Any) -> "torch.Tensor":
    """``call(x_rows, t, context, kwargs, extras)`` once per group, the outputs in ``x``'s row order."""
    import torch

    out = None
    for group in groups:
        step = t[group.rows] if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == x.shape[0] else t
        part = call(x[group.rows], step, group.context, group.kwargs, group.extras)
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[group.rows] = part
    assert out is not None
    return out
