"""Mistral's Tekken tokenizer, built offline from the ``tekken.json`` a text-encoder file carries.

FLUX.2 [dev] (Mistral Small 3) and ERNIE-Image (Ministral 3) encode prompts with Mistral models
whose tokenizer is Tekken: a tiktoken-style byte-level BPE (base64 token bytes in rank order, a
split pattern) with its control tokens (``<s>``, ``[INST]``, ``[SYSTEM_PROMPT]`` ...) numbered
first and the BPE ranks after them. Comfy-Org's single-file text encoders embed the release's
``tekken.json`` as a uint8 tensor named ``tekken_model``; a diffusers folder keeps it as
``tokenizer/tekken.json``. Either way nothing is fetched.

The conversion to a ``tokenizers`` BPE is transformers' own (``MistralConverter``, the code
behind its ``convert_tekken_tokenizer``; it needs no ``mistral_common`` for the current file
format, which lists its special tokens). Deriving the merges of a 131k vocabulary takes seconds,
so the result is cached by the file's sha256 (nodes.checkpoint.bpe_ranks.cached_json).
``tests/test_tekken_tokenizer.py`` checks the ids against tiktoken on the same ranks.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import bpe_ranks
from nodes.checkpoint.tokenizer_memo import kept

#: The tensor under which Comfy-Org's Mistral text-encoder files carry ``tekken.json``.
TEKKEN_KEY = "tekken_model"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


class TekkenError(ValueError):
    """The bytes are not a Tekken vocabulary Kiln can read (the message says why)."""


def tekken_bytes(state: Mapping[str, Any]) -> bytes | None:
    """The ``tekken.json`` bytes stored in a text-encoder state dict, or None when it has none."""
    from nodes.checkpoint.tensors import stored_bytes

    return stored_bytes(state.get(TEKKEN_KEY))


def _check(data: bytes) -> None:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TekkenError(f"its {TEKKEN_KEY} is not a tekken.json ({error})") from None
    if not isinstance(raw, dict) or "vocab" not in raw or "config" not in raw:
        raise TekkenError(f"its {TEKKEN_KEY} is not a tekken.json (no vocab or config)")
    if "special_tokens" not in raw:
        raise TekkenError(f"its {TEKKEN_KEY} is an early Tekken file without a special_tokens list "
                          "(version " + str(raw["config"].get("version", "?")) + "); Kiln reads the current format "
                          "(Mistral Small 3.x, Ministral 3)")


def _convert(data: bytes) -> Any:
    from transformers.integrations.mistral.tokenizer import MistralConverter

    with tempfile.TemporaryDirectory(prefix="kiln-tekken-") as folder:
        path = Path(folder) / "tekken.json"
        path.write_bytes(data)
        return MistralConverter(vocab_file=str(path)).converted()


def tekken_tokenizer(data: bytes, padding_side: str = "left") -> Any:
    """A transformers ``PreTrainedTokenizerFast`` for the Tekken vocabulary in ``data``.

    No BOS is added by encoding: the prompt templates of FLUX.2 and ERNIE-Image write ``<s>``
    (or put it first themselves), as the releases' chat templates do. ``padding_side`` is the
    caller's: ComfyUI pads Mistral prompts on the left.
    """
    from transformers import PreTrainedTokenizerFast

    import transformers

    _check(data)

    def convert() -> Any:
        try:
            return _convert(data)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a tekken.json damaged inside
            raise TekkenError(f"its {TEKKEN_KEY} could not be read as a Tekken vocabulary ({exc!r})") from None

    # the converter is transformers': its version is part of what the cached file was built by
    digest = hashlib.sha256(data).hexdigest() + transformers.__version__

    def build() -> Any:
        path = bpe_ranks.cached_json("tekken-tokenizer", digest, convert)
        return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                       unk_token=UNK, padding_side=padding_side, model_max_length=131072)

    return kept(("tekken", digest, padding_side), build)


def instruction(prompt: str, system: str = "") -> str:
    """One user turn in Mistral's instruct format, after ``<s>``: ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]``
    when there is a system prompt, then ``[INST]prompt[/INST]`` (FLUX.2 [dev]'s prompt and Ministral 3's
    chat both write it so)."""
    head = f"[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT]" if system else ""
    return f"{head}[INST]{prompt}[/INST]"


def tokenizer_in_file(state: Mapping[str, Any], what: str, release_files: str) -> Any:
    """The Tekken tokenizer a text-encoder file carries (``tekken_model``). A file without it, or with other
    bytes there, is a CheckpointError naming ``what`` and the Comfy-Org files (``release_files``) that carry
    one: Kiln fetches no tokenizer."""
    from nodes.checkpoint.load import CheckpointError

    data = tekken_bytes(state)
    if data is None:
        raise CheckpointError(f"{what} carries no {TEKKEN_KEY} tensor (Mistral's tekken.json), which Kiln reads the "
                              f"tokenizer from; give CLIPLoader a file that carries it, such as Comfy-Org's "
                              f"{release_files}")
    try:
        return tekken_tokenizer(data)
    except TekkenError as exc:
        raise CheckpointError(f"{what}: {exc}") from None


def folder_tekken(folder: Path) -> bytes | None:
    """``tekken.json`` of a diffusers folder's tokenizer (``folder/tekken.json``), or None."""
    path = Path(folder) / "tekken.json"
    return path.read_bytes() if path.is_file() else None
