"""Self-attention guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using
Self-Attention Guidance"): guide away from what the network predicts once the regions its
middle block attends to most are blurred.

At each evaluation, with the unconditional side's clean-latent prediction x0_u and the
attention probabilities of the middle block's first self-attention on that side:

1. the keys that draw more than ``threshold`` (1.0) total attention, averaged over heads,
   mark the salient regions (a mask on the middle block's grid, scaled up nearest-neighbour
   to the latent);
2. there x0_u is blurred (a 9-tap Gaussian of ``blur_sigma``, reflected at the edges):
   the degraded prediction x0_d;
3. x0_d is noised back with x0_u's own noise (x_d = x0_d + x - x0_u) and the network is run
   on it with the unconditional prompt, giving x0_s;
4. the guided result moves by ``scale * (x0_d - x0_s)``.

That is ComfyUI's SelfAttentionGuidance, computed on clean-latent predictions as ComfyUI's
post-CFG hook does (so v-prediction models work alike); on an epsilon model it is diffusers'
StableDiffusionSAGPipeline, ``noise += scale * (eps_u - eps_s)``. The attention is recorded in
a pass of its own over the unconditional side, so batching, regional prompts and cross-job
batches need no bookkeeping of which rows were unconditional: one network pass more per step
than ComfyUI, which records during its batched pass. A blur of 0 changes nothing (ComfyUI's
Gaussian divides by it).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

from nodes.families.perturbed import SelfAttentionProcessor, middle_self_attentions

#: Total attention a key must draw (summed over queries, averaged over heads) to be salient.
THRESHOLD = 1.0
KERNEL = 9


@dataclass(frozen=True)
class SelfAttentionSettings:
    scale: float
    blur_sigma: float


class RecordingSelfAttention(SelfAttentionProcessor):
    """Plain attention (softmax(QK^T / sqrt(d)) V) that keeps its probabilities [B * heads, n, n]."""

    def __init__(self) -> None:
        self.probs: Any = None
        self.heads = 0

    def attend(self, attn: Any, tokens: Any) -> Any:
        query = attn.head_to_batch_dim(attn.to_q(tokens))
        key = attn.head_to_batch_dim(attn.to_k(tokens))
        value = attn.head_to_batch_dim(attn.to_v(tokens))
        probs = attn.get_attention_scores(query, key, None)
        self.probs, self.heads = probs.float(), attn.heads
        return attn.batch_to_head_dim(probs.to(value.dtype) @ value)


def middle_self_attention(network: Any) -> Any:
    """The first self-attention of ``network``'s middle block (ComfyUI's "middle", 0, 0)."""
    return middle_self_attentions(network, "self-attention guidance")[0]


@contextlib.contextmanager
def recording(network: Any) -> Iterator[RecordingSelfAttention]:
    """``network`` with its middle self-attention recording its probabilities while the block runs."""
    module = middle_self_attention(network)
    saved, recorder = module.processor, RecordingSelfAttention()
    module.processor = recorder
    try:
        yield recorder
    finally:
        module.processor = saved


def gaussian_blur(x: Any, sigma: float, size: int = KERNEL) -> Any:
    """``x`` [B, C, h, w] blurred channel by channel, the edges reflected."""
    import torch

    half = (size - 1) / 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, size) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.device, x.dtype)
    kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, size, size)
    padded = torch.nn.functional.pad(x, [size // 2] * 4, mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel, groups=x.shape[1])


def grid(tokens: int, h: int, w: int) -> tuple[int, int]:
    """The middle block's (rows, columns) for ``tokens`` positions of an h x w latent: the divisor
    of ``tokens`` nearest the rows the latent's aspect ratio gives (ComfyUI's search)."""
    rows = round(math.sqrt(h / w * tokens))
    for step in range(0, math.floor(math.sqrt(tokens) / 2)):
        for candidate in (rows + step, max(1, rows - step)):
            if tokens % candidate == 0:
                return candidate, tokens // candidate
    return rows, tokens // rows


def degraded(x0: Any, probs: Any, heads: int, blur_sigma: float) -> Any:
    """x0 [B, C, h, w] blurred where the attention ``probs`` [B * heads, n, n] marks it salient."""
    import torch

    b, _, h, w = x0.shape
    n = probs.shape[-1]
    salient = probs.reshape(b, heads, n, n).mean(1).sum(1) > THRESHOLD
    rows, cols = grid(n, h, w)
    mask = torch.nn.functional.interpolate(salient.reshape(b, 1, rows, cols).to(x0.dtype), (h, w))
    return gaussian_blur(x0, blur_sigma) * mask + x0 * (1 - mask)
