"""The Qwen tokenizer Kiln builds from the shipped ranks tokenises as tiktoken does.

tiktoken is the reference implementation of this byte-level BPE (Qwen's first
tokenizer was a tiktoken encoding over these very ranks); running it on the same
ranks and split rule gives the ids the Qwen team's tokenizers produce.
"""
from __future__ import annotations

import unicodedata

import pytest
import tiktoken

from ranks_tokenizers import whole_tokens_as_tiktoken
from nodes.checkpoint import llama_tokenizer as lt
from nodes.checkpoint import qwen_tokenizer as qt

TEXTS = [
    "a red house by a lake",
    "A photo of a CAT, sitting on a mat. It's 3:45pm; they'll leave at 12345!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n  indented\n",
    "Ünïcödé: café, naïve, 東京の夜景, 北京烤鸭, 한국어, русский текст, العربية",
    "emoji 🐱🏠🌅 and combined e\u0301 (NFC folds this)",
    "code: def f(x):\n    return x**2  # square\n",
    "<|im_start|>system\nDescribe the image.<|im_end|>\n<|im_start|>user\nA cat<|im_end|>\n",
    "<|vision_start|><|image_pad|><|vision_end|>Change the sky to night.",
    "x" * 300 + " " + "word " * 50,
]


def _reference(version: str) -> tiktoken.Encoding:
    ranks = qt.token_ranks()
    specials = {token: len(ranks) + i for i, token in enumerate(qt.SPECIAL_TOKENS[version])}
    return tiktoken.Encoding(f"qwen{version}", pat_str=qt.PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module", params=["2.5", "3"])
def pair(request):
    return qt.qwen_tokenizer(request.param), _reference(request.param), request.param


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken_on_the_same_ranks(pair, text):
    tokenizer, reference, _ = pair
    ids = tokenizer(text, add_special_tokens=True).input_ids
    assert ids == reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_every_token_is_one_id_and_the_specials_follow_the_vocabulary(pair):
    tokenizer, reference, version = pair
    ranks = qt.token_ranks()
    assert len(ranks) == 151643 and sorted(ranks.values()) == list(range(151643))
    # Tokens through the whole vocabulary, each as its own text: mostly one id (this
    # fails if the merges do not rebuild long tokens), always the reference's ids.
    whole = whole_tokens_as_tiktoken(tokenizer, reference, ranks, 499, lambda t: unicodedata.normalize("NFC", t))
    assert whole > 250
    specials = qt.SPECIAL_TOKENS[version]
    assert tokenizer.convert_tokens_to_ids(list(specials)) == list(range(151643, 151643 + len(specials)))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"
    assert ("<think>" in specials) == (version == "3")


@pytest.mark.parametrize("module,file", [(qt, "qwen.tiktoken"), (lt, "tokenizer.model")])
def test_a_damaged_ranks_file_is_refused(tmp_path, monkeypatch, module, file):
    """Qwen's ranks and Llama 3's (nodes/checkpoint/llama_tokenizer.py): one checksum rule."""
    damaged = tmp_path / file
    damaged.write_bytes(b"IQ== 0\n")
    monkeypatch.setattr(module, "ranks_file", lambda: damaged)
    module.token_ranks.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="damaged"):
            module.token_ranks()
    finally:
        module.token_ranks.cache_clear()
