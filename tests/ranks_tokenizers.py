"""What the tests of the tokenizers built from tiktoken ranks share (Qwen's, Llama 3's)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def whole_tokens_as_tiktoken(tokenizer: Any, reference: Any, ranks: dict[bytes, int], stride: int,
                             normalize: Callable[[str], str] = lambda text: text) -> int:
    """Tokens through the whole vocabulary (every ``stride``-th), each as its own text: always the
    reference's ids (asserted), mostly one id (returned: how many; few means the merges do not rebuild long
    tokens). ``tokenizer`` adds no special tokens; ``normalize`` is what the tokenizer does to text first."""
    whole = 0
    for token, rank in list(ranks.items())[::stride]:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a partial UTF-8 sequence has no text of its own
        expected = reference.encode(normalize(text))
        assert tokenizer(text).input_ids == expected, (text, rank)
        whole += expected == [rank]
    return whole
