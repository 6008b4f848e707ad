"""The SentencePiece model a Comfy-Org text-encoder file carries in itself.

Comfy-Org's single-file text encoders whose tokenizer is SentencePiece (UMT5-XXL for Wan and
ChronoEdit; Gemma's) store the serialized model proto as a uint8 tensor named ``spiece_model``;
ComfyUI hands those bytes to ``sentencepiece`` as they are. Reading them is this one function, so
every family that needs such a tokenizer reads the same key the same way, and nothing is fetched.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The tensor under which Comfy-Org's files carry the serialized SentencePiece model.
SPIECE_KEY = "spiece_model"


def spiece_bytes(state: Mapping[str, Any]) -> bytes | None:
    """The serialized SentencePiece model stored in a text-encoder state dict (``spiece_model``, any
    integer tensor or raw bytes), or None when the file carries none."""
    data = state.get(SPIECE_KEY)
    if data is None:
        return None
    if hasattr(data, "numpy"):
        return data.detach().cpu().contiguous().numpy().tobytes()
    return bytes(data)
