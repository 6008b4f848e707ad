"""The Llama 3 tokenizer Kiln builds from Meta's shipped ranks tokenises as tiktoken does.

tiktoken is the reference implementation of this byte-level BPE and Meta's own
Llama 3 tokenizer is a tiktoken encoding over these very ranks, split rule and
special tokens; the ids below are what Meta's tokenizer produces (plus the
leading ``<|begin_of_text|>`` the Hugging Face tokenizer adds).
"""
from __future__ import annotations

import functools

import pytest
import tiktoken

from ranks_tokenizers import whole_tokens_as_tiktoken
from test_qwen_tokenizer import TEXTS as QWEN_TEXTS
from nodes.checkpoint import llama_tokenizer as lt

#: Qwen's test texts (their Qwen markers are plain text here) and Llama's own: digit runs, its chat markers.
TEXTS = QWEN_TEXTS + [
    "code: def f(x):\n    return x**2  # square 1234567\n",
    "<|start_header_id|>user<|end_header_id|>\n\nA cat<|eot_id|>",
]


@pytest.fixture(scope="module")
def pair():
    ranks = lt.token_ranks()
    specials = {token: len(ranks) + i for i, token in enumerate(lt.SPECIAL_TOKENS)}
    reference = tiktoken.Encoding("llama3", pat_str=lt.PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return lt.llama3_tokenizer(), reference


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken_on_the_same_ranks(pair, text):
    tokenizer, reference = pair
    ids = tokenizer(text).input_ids
    assert ids == [128000] + reference.encode(text, allowed_special="all")
    assert tokenizer.decode(ids[1:]) == text


def test_every_token_is_one_id_and_the_specials_follow_the_vocabulary(pair):
    tokenizer, reference = pair
    ranks = lt.token_ranks()
    assert len(ranks) == 128000 and sorted(ranks.values()) == list(range(128000))
    plain = functools.partial(tokenizer, add_special_tokens=False)  # no <|begin_of_text|>
    whole = whole_tokens_as_tiktoken(plain, reference, ranks, 401)
    assert whole > 250
    assert len(lt.SPECIAL_TOKENS) == 256
    assert tokenizer.convert_tokens_to_ids(list(lt.SPECIAL_TOKENS)) == list(range(128000, 128256))
    assert tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]) == [128001, 128009]
    assert tokenizer.pad_token_id == 128009 and tokenizer.padding_side == "right"
    padded = tokenizer("a cat", padding="max_length", max_length=8).input_ids
    assert padded[0] == 128000 and padded[-1] == 128009 and len(padded) == 8


# A damaged ranks file is refused: tests/test_qwen_tokenizer.py checks both tokenizers' files.
