"""CLIP text-encoder config values that tensor shapes cannot tell.

Shapes give widths and depths; token ids and the activation depend on which CLIP
it is (OpenAI's or OpenCLIP's), whatever family uses it. Everything that belongs
to a model family lives in :mod:`nodes.families`.
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import TEXT_HEAD_WIDTH

__all__ = ["TEXT_HEAD_WIDTH", "text_config_defaults"]

# Token ids: OpenAI CLIP (SD 1.x and SDXL's first encoder) pads with <|endoftext|>;
# the OpenCLIP encoders' diffusers configs carry the legacy ids 0/1/2, which make
# transformers pool at the argmax token (the end token) as OpenCLIP does.
_OPENAI_IDS = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu")
_OPENCLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="gelu")


def text_config_defaults(kind: str) -> dict[str, Any]:
    """transformers CLIPTextConfig values that shapes cannot tell (kind: "openai" | "openclip")."""
    base = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                attention_dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
    return {**base, **(_OPENAI_IDS if kind == "openai" else _OPENCLIP_IDS)}
