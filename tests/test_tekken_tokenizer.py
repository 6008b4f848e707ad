"""Mistral's Tekken tokenizer read from the bytes a text-encoder file carries (nodes/checkpoint/tekken_tokenizer.py).

The reference is tiktoken on the same ranks and split pattern (the BPE Tekken is), with the
control tokens numbered first as Tekken numbers them.
"""
from __future__ import annotations

import json

import pytest
import tiktoken
import torch

from nodes.checkpoint import tokenizer_memo
from nodes.checkpoint.tekken_tokenizer import TekkenError, tekken_bytes, tekken_tokenizer
from tiny_tekken import CORPUS, NUM_SPECIAL, PATTERN, SPECIALS, tekken_json


@pytest.fixture(scope="module")
def tekken() -> tuple[bytes, dict[bytes, int]]:
    return tekken_json()


def _reference(ranks: dict[bytes, int], text: str) -> list[int]:
    enc = tiktoken.Encoding("tiny-tekken", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    return [i + NUM_SPECIAL for i in enc.encode_ordinary(text)]


@pytest.mark.parametrize("text", ["the theme of the thesis", "Hello wörld, café 2024!", "a\n\n b   c  ",
                                  "naïve — Photo of a FOX", "there then"])
def test_ids_equal_tiktoken_on_the_same_ranks(tekken, text):
    data, ranks = tekken
    tok = tekken_tokenizer(data)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == _reference(ranks, text)
    assert tok.decode(ids) == text
    assert any(i >= NUM_SPECIAL + 256 for i in _reference(ranks, "the theme")), "the merges are exercised"


def test_control_tokens_keep_their_ranks_and_merged_text_around_them(tekken):
    data, ranks = tekken
    tok = tekken_tokenizer(data)
    text = "the fox"
    ids = tok(f"<s>[SYSTEM_PROMPT]hello[/SYSTEM_PROMPT][INST]{text}[/INST]", add_special_tokens=False)["input_ids"]
    assert ids == ([1, 5] + _reference(ranks, "hello") + [6, 3] + _reference(ranks, text) + [4])
    assert tok.pad_token_id == SPECIALS.index("<pad>") and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.padding_side == "left"


def test_ranks_beyond_the_vocab_size_are_never_produced(tekken):
    data, ranks = tekken
    tok = tekken_tokenizer(data)
    top = NUM_SPECIAL + len(ranks)
    assert max(tok(CORPUS, add_special_tokens=False)["input_ids"]) < top
    assert len(tok) == top


def test_read_from_the_tensor_a_comfyui_file_carries(tekken):
    data, ranks = tekken
    state = {"tekken_model": torch.frombuffer(bytearray(data), dtype=torch.uint8), "model.norm.weight": torch.ones(2)}
    assert tekken_bytes(state) == data
    assert tekken_bytes({"model.norm.weight": torch.ones(2)}) is None
    assert tekken_tokenizer(tekken_bytes(state))("the", add_special_tokens=False)["input_ids"] == _reference(ranks, "the")


def test_other_bytes_are_refused_with_the_reason(tekken):
    data, _ = tekken
    with pytest.raises(TekkenError, match="not a tekken.json"):
        tekken_tokenizer(b"\x00\x01 not json")
    with pytest.raises(TekkenError, match="no vocab or config"):
        tekken_tokenizer(b'{"a": 1}')
    early = json.loads(data)
    del early["special_tokens"]
    early["config"]["version"] = "v3"
    with pytest.raises(TekkenError, match=r"early Tekken file .*version v3"):
        tekken_tokenizer(json.dumps(early).encode())


def test_a_file_damaged_inside_is_refused_and_leaves_no_cache_behind(tekken, tmp_path, monkeypatch):
    """Right keys, broken entries: the converter's own error becomes a TekkenError with the reason, and the
    cache folder keeps no half-written file."""
    data, _ = tekken
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    damaged = json.loads(data)
    del damaged["vocab"][300]["token_bytes"]
    with pytest.raises(TekkenError, match="could not be read as a Tekken vocabulary"):
        tekken_tokenizer(json.dumps(damaged).encode())
    assert list(tmp_path.iterdir()) == []
    tokenizer_memo.forget()  # an earlier test on this thread built it already
    tekken_tokenizer(data)
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]  # a good one is cached there
