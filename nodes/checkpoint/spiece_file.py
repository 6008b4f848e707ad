"""The SentencePiece model a Comfy-Org text-encoder file carries in itself, and the tokenizer it makes.

Comfy-Org's single-file text encoders whose tokenizer is SentencePiece (UMT5-XXL for Wan and
ChronoEdit; Gemma's for Lumina 2) store the serialized model proto as a uint8 tensor named
``spiece_model`` (``text_encoders.spiece_model`` in a checkpoint); ComfyUI hands those bytes to
``sentencepiece`` as they are. Finding and reading them is :func:`spiece_bytes`, and the tokenizer over
them is :class:`SpieceTokenizer`, so every family that needs one reads the same key the same way and
nothing is fetched. Families differ only in the special tokens around the text (Gemma: BOS first;
UMT5: EOS last).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError

#: The tensor under which Comfy-Org's files carry the serialized SentencePiece model.
SPIECE_KEY = "spiece_model"


def spiece_key(state: Mapping[str, Any], prefix: str = "") -> str | None:
    """Where ``state`` keeps its SentencePiece model: ``prefix + spiece_model``, or that name at any depth
    below ``prefix`` (a checkpoint's ``text_encoders.spiece_model``); None when it keeps none."""
    return next((k for k in state if k.startswith(prefix) and (k == prefix + SPIECE_KEY
                                                                or k.endswith("." + SPIECE_KEY))), None)


def spiece_bytes(state: Mapping[str, Any], prefix: str = "") -> bytes | None:
    """The serialized SentencePiece model stored in a text-encoder state dict (:func:`spiece_key`; any
    integer tensor or raw bytes), or None when the file carries none."""
    from nodes.checkpoint.tensors import stored_bytes

    key = spiece_key(state, prefix)
    return None if key is None else stored_bytes(state[key])


class SpieceTokenizer:
    """A SentencePiece model's ids as ComfyUI's tokenizers give them: ``bos`` puts the start token first
    (Gemma), ``eos`` the end token last (UMT5); no padding, no cut. Called as a transformers tokenizer
    is (``tok(text)["input_ids"]`` or ``tok(text).input_ids``), so the families read either."""

    def __init__(self, model_proto: bytes, what: str = "the file", bos: bool = False, eos: bool = False) -> None:
        import sentencepiece

        self.model_proto, self.what, self.bos, self.eos = model_proto, what, bos, eos
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, TypeError, OSError, ValueError) as exc:
            raise CheckpointError(f"{what}: its {SPIECE_KEY} is not a SentencePiece model ({exc})") from None
        self.bos_token_id = int(self.processor.bos_id())
        self.eos_token_id = int(self.processor.eos_id())
        self.pad_token_id = max(int(self.processor.pad_id()), 0)
        for wanted, token, name in ((bos, self.bos_token_id, "start"), (eos, self.eos_token_id, "end")):
            if wanted and token < 0:
                raise CheckpointError(f"{what}: its {SPIECE_KEY} has no {name} token, which these prompts need")

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any:
        from transformers import BatchEncoding

        ids = [int(i) for i in self.processor.encode(text)]
        if add_special_tokens:
            ids = [self.bos_token_id] * self.bos + ids + [self.eos_token_id] * self.eos
        return BatchEncoding({"input_ids": ids})

    def __len__(self) -> int:
        return int(self.processor.get_piece_size())

    def __reduce__(self) -> tuple:  # the processor does not pickle; its model does
        return (SpieceTokenizer, (self.model_proto, self.what, self.bos, self.eos))
