"""UMT5-XXL, the text encoder of Wan 2.1 and ChronoEdit, from Comfy-Org's single file.

``umt5_xxl_fp16.safetensors`` / ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (CLIPLoader type ``wan``)
hold transformers' UMT5 encoder names (``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q``,
...), which are T5's: what tells UMT5 apart is a relative attention bias in every block (T5 has one,
in block 0) and the tokenizer the file carries (``spiece_model``: nodes.checkpoint.spiece_file). The
build is T5's (nodes.checkpoint.flux_load.build_t5: config from the shapes, fp8 scales through
nodes.checkpoint.scaled_fp8) as transformers' ``UMT5EncoderModel``.

The tokenizer is that SentencePiece model read by ``sentencepiece`` itself, as ComfyUI reads it: the
prompt's pieces and the end token, no start token (UMT5's ids: pad 0, end 1).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.spiece_file import SPIECE_KEY, SpieceTokenizer, spiece_bytes

T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
#: UMT5's own mark: block 1 has its relative attention bias (T5 v1.1 shares block 0's).
SECOND_BIAS = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"


def umt5_prefix(keys: Any) -> str | None:
    """The prefix of a UMT5 encoder among ``keys`` (a T5-named encoder with a relative attention bias in
    block 1, or carrying its SentencePiece model), else None."""
    keys = set(keys)
    for key in keys:
        if key.endswith(T5_MARKER):
            prefix = key[: -len(T5_MARKER)]
            if prefix + SECOND_BIAS in keys or SPIECE_KEY in keys:
                return prefix
    return None


def build_umt5(state: Mapping[str, Any], prefix: str, what: str, dtype: Any) -> Any:
    """transformers' ``UMT5EncoderModel`` holding the file's encoder (its tokenizer tensor left out)."""
    from nodes.checkpoint.flux_load import build_t5
    from nodes.checkpoint.tensors import plain

    weights = {k: v for k, v in plain(state).items() if k != SPIECE_KEY}
    return build_t5(weights, prefix, what, dtype, umt5=True)


def umt5_tokenizer(state: Mapping[str, Any], what: str) -> SpieceTokenizer:
    """The tokenizer a UMT5 file carries; a file without one is a CheckpointError saying so."""
    data = spiece_bytes(state)
    if data is None:
        raise CheckpointError(f"{what} carries no tokenizer ({SPIECE_KEY}); Kiln reads UMT5's SentencePiece model "
                              "from the file, as Comfy-Org's umt5_xxl_*.safetensors carry it (a T5-XXL file, "
                              "FLUX's t5xxl, is not UMT5)")
    return SpieceTokenizer(data, what, eos=True)
