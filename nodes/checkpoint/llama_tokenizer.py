"""The Llama 3 byte-level BPE tokenizer, built offline from Meta's token ranks.

HiDream-I1 encodes prompts with Llama 3.1 8B Instruct; a ComfyUI-style
``llama_3.1_8b_instruct*.safetensors`` carries no tokenizer, and transformers
would fetch one from a gated hub repository. Meta's own ``llama-models`` package
on PyPI ships the ranks (``llama_models/llama3/tokenizer.model``, tiktoken
format; a pinned requirement installed with --no-deps, its checksum verified on
every read). The split rule and the 256 special tokens numbered after the
128,000 ranks are the ones Meta's ``llama_models/llama3/tokenizer.py`` uses;
the ids HiDream relies on (``<|begin_of_text|>`` 128000, ``<|eot_id|>`` 128009)
are the same in every Llama 3.x release. Unlike Qwen's, Llama 3's tokenizer does
not normalise the text, and it starts every sequence with ``<|begin_of_text|>``.
``tests/test_llama_tokenizer.py`` checks the ids against tiktoken on the same ranks.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from nodes.checkpoint import bpe_ranks
from nodes.checkpoint.tokenizer_memo import kept

#: sha256 of llama-models 0.3.0's ``llama_models/llama3/tokenizer.model``.
RANKS_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
#: Llama 3's split rule: as Qwen's, but digits go in runs of up to three.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BEGIN_OF_TEXT = "<|begin_of_text|>"
EOT = "<|eot_id|>"
_NAMED = (
    BEGIN_OF_TEXT, "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    EOT, "<|python_tag|>", "<|image|>",
)
#: The 256 special tokens in id order from 128000 (the rest are numbered reserved tokens).
SPECIAL_TOKENS = _NAMED + tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED)))


def ranks_file() -> Path:
    """Where the ``llama-models`` package keeps Llama 3's ranks (found without importing it)."""
    return bpe_ranks.package_file("llama_models", "llama3/tokenizer.model", "Llama 3 tokenizer's")


@lru_cache(maxsize=1)
def token_ranks() -> dict[bytes, int]:
    """Token bytes -> rank (= id), from the package's file, checksum verified."""
    return bpe_ranks.read_ranks(ranks_file(), RANKS_SHA256)


def _build() -> Any:
    from tokenizers import processors

    backend = bpe_ranks.build(token_ranks(), PATTERN, SPECIAL_TOKENS, False, "Llama 3")
    bos = (BEGIN_OF_TEXT, backend.token_to_id(BEGIN_OF_TEXT))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A", pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B", special_tokens=[bos])
    return backend


@lru_cache(maxsize=1)
def tokenizer_json() -> Path:
    """The built tokenizer as a ``tokenizer.json`` in the cache folder (built once)."""
    return bpe_ranks.cached_json("llama3-tokenizer", f"{RANKS_SHA256}{PATTERN}{SPECIAL_TOKENS}bos", _build)


def llama3_tokenizer() -> Any:
    """A transformers ``PreTrainedTokenizerFast`` as Llama 3.1 Instruct's, padded as HiDream pads it.

    HiDreamImagePipeline sets the pad token to the eos token, which Llama 3.1
    Instruct's tokenizer names ``<|eot_id|>`` (ComfyUI pads HiDream's Llama
    prompt with its id, 128009, as well); padding goes on the right.
    """
    from transformers import PreTrainedTokenizerFast

    return kept("llama3", lambda: PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json()),
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=131072,
        padding_side="right",
        clean_up_tokenization_spaces=True,
    ))
