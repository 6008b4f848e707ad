"""Text encoding for CLIP-conditioned families, driven by each family's encoder specs.

A prompt with no weights and at most 77 tokens gives exactly what diffusers'
``encode_prompt`` gives (the parity tests hold this). Which hidden layer, whether
the final norm applies, and how several encoders combine come from the family's
:class:`~nodes.families.base.TextEncoderSpec` list, so this module names no family.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from nodes.families.base import TextEncoderSpec


class LayerError(ValueError):
    """A CLIPSetLastLayer value the encoder cannot give."""


def final_norm(te: Any) -> Any:
    """The encoder's final layer norm (transformers 5 flattened ``text_model``)."""
    inner = getattr(te, "text_model", te)
    return inner.final_layer_norm


def hidden_state(te: Any, ids: "torch.Tensor", spec: "TextEncoderSpec", layer: int) -> tuple["torch.Tensor", Any]:
    """(hidden states [n, tokens, width] of the built encoder's ``layer``, pooled output or None)."""
    depth = te.config.num_hidden_layers
    if not -depth <= layer <= -1:
        raise LayerError(f"layer {layer - spec.dropped} is outside this {depth + spec.dropped}-layer text encoder")
    out = te(ids.to(te.device), output_hidden_states=layer != -1)
    if layer == -1:
        states = out.last_hidden_state
    else:
        states = out.hidden_states[layer]
        if spec.norm_hidden:
            states = final_norm(te)(states)
    pooled = out.text_embeds if spec.pooled else None
    return states, pooled


def encode(clip: Any, text: str) -> list:
    """CONDITIONING [[embeds [1, tokens, dim] float32 CPU, {"pooled_output": tensor | None}]]."""
    import torch

    family = clip.family
    states, pooled = [], None
    with torch.inference_mode():
        for spec in family.text_encoders:
            ids, _ = clip.tokenize(text, spec.tokenizer)
            with clip.encoder(spec.module) as te:
                h, p = hidden_state(te, torch.tensor([ids]), spec, family.encoder_layer(spec, clip.layer))
            states.append(h.to("cpu", torch.float32))
            if p is not None:
                pooled = p.to("cpu", torch.float32)
    return [[family.combine_text(states), {"pooled_output": pooled}]]
