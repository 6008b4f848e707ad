"""Perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377): the denoiser's second
opinion from the same network with the middle block's self-attention made the identity
(each token attends only to itself, so the output is its value projection). Guiding away
from that degraded prediction sharpens structure without a negative prompt.

Which layers: every self-attention ("attn1") inside the UNet's middle block, as ComfyUI's
PerturbedAttentionGuidance node and diffusers' ``pag_applied_layers=["mid"]`` choose.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from nodes.families.base import ConditioningError


class SelfAttentionProcessor:
    """The frame of a diffusers self-attention processor (the norms, the image <-> token
    reshaping, the residual); :meth:`attend` is what a guidance method changes."""

    def attend(self, attn: Any, tokens: Any) -> Any:
        raise NotImplementedError

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.view(shape[0], shape[1], -1).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = attn.to_out[1](attn.to_out[0](self.attend(attn, hidden_states)))
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class IdentitySelfAttention(SelfAttentionProcessor):
    """Attention with the identity matrix in place of softmax(QK^T): each token's value."""

    def attend(self, attn: Any, tokens: Any) -> Any:
        return attn.to_v(tokens)


def middle_self_attentions(network: Any, method: str = "perturbed-attention guidance") -> list[Any]:
    """The self-attention modules of ``network``'s middle block; ConditioningError naming the
    guidance ``method`` when it has none."""
    middle = getattr(getattr(network, "kiln_network", network), "mid_block", None)
    found = [m for name, m in middle.named_modules() if name.endswith("attn1")] if middle is not None else []
    if not found:
        raise ConditioningError(f"{method} needs a UNet with self-attention in its middle block", "model")
    return found


@contextlib.contextmanager
def identity_middle_attention(network: Any) -> Iterator[None]:
    """``network`` with its middle block's self-attention made the identity while the block runs."""
    modules = middle_self_attentions(network)
    saved = [m.processor for m in modules]
    identity = IdentitySelfAttention()
    for m in modules:
        m.processor = identity
    try:
        yield
    finally:
        for m, processor in zip(modules, saved):
            m.processor = processor
