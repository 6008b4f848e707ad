"""A tiny Tekken vocabulary (Mistral's tokenizer format) for tests: a byte-level BPE trained on a small
corpus, its control tokens numbered first as Tekken numbers them, the last ranks beyond
``default_vocab_size`` (a real file's ranks past it must never be produced).

API:
    tekken_json() -> (the tekken.json bytes, {token bytes: rank} of the ranks kept) (cached)
    tekken_file(corpus, merges, specials, num_special, dropped) -> the same for another vocabulary
"""
from __future__ import annotations

import base64
import collections
import functools
import json

#: The split pattern the current Tekken files carry in their config.
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]
NUM_SPECIAL = 12  # more than listed: the rest are fillers, as in real files (1000 there)
CORPUS = ("the theme of the thesis: there, then. Hello hello world, wörld Café café 2024 — naïve "
          "A photo of a red fox in the snow\nwith\n\n  trailing spaces   ") * 3
DROPPED = 3  # the last ranks lie beyond default_vocab_size and must never be produced


def _train_ranks(corpus: bytes, merges: int) -> list[bytes]:
    """A small byte-level BPE vocabulary in rank order: the 256 bytes, then frequent pairs merged."""
    ranks = [bytes([b]) for b in range(256)]
    words = [[bytes([b]) for b in w.encode()] for w in corpus.decode().split(" ")]
    for _ in range(merges):
        pairs = collections.Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (left, right), _count = pairs.most_common(1)[0]
        ranks.append(left + right)
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == left and w[j + 1] == right:
                    out.append(left + right)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    return ranks


def tekken_file(corpus: str, merges: int, specials: list[str], num_special: int,
                dropped: int = 0) -> tuple[bytes, dict[bytes, int]]:
    """(tekken.json bytes, {token bytes: rank} of the ranks kept): ``merges`` BPE ranks trained on
    ``corpus``, ``specials`` at ranks 0.. (fillers up to ``num_special``), the last ``dropped`` ranks
    beyond ``default_vocab_size``."""
    ranks = _train_ranks(corpus.encode(), merges)
    kept = ranks[:len(ranks) - dropped]
    doc = {
        "config": {"pattern": PATTERN, "num_vocab_tokens": len(ranks),
                   "default_vocab_size": num_special + len(kept), "default_num_special_tokens": num_special,
                   "version": "v7"},
        "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": None}
                  for r, t in enumerate(ranks)],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
    }
    return json.dumps(doc).encode(), {t: r for r, t in enumerate(kept)}


@functools.lru_cache(maxsize=None)
def tekken_json() -> tuple[bytes, dict[bytes, int]]:
    return tekken_file(CORPUS, 60, SPECIALS, NUM_SPECIAL, DROPPED)
