"""The CLIP BPE tokenizer, built offline from data the project ships.

Single-file checkpoints carry no tokenizer, and diffusers would fetch one from a
hub. The byte-pair merges are OpenAI's (MIT licensed, the same file the
open-clip-torch and clip-anytorch wheels carry); the vocabulary is derived from
them exactly as OpenAI's ``SimpleTokenizer`` does, so only the merges are committed
(xz-compressed, ~180 KB). ``vocab.json``/``merges.txt`` are written to a cache
folder at first use, which makes the result loadable by any transformers version
with plain ``CLIPTokenizer.from_pretrained(folder)``.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from nodes.checkpoint.tokenizer_memo import kept

ASSET = Path(__file__).resolve().parent.parent / "assets" / "clip_bpe_merges.txt.xz"
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: SD 1.x's tokenizer pads with the end token; OpenCLIP-based ones (SD 2.x,
#: SDXL's second encoder) pad with "!" (id 0), as their diffusers repos do.
PAD_EOS, PAD_BANG = EOS, "!"


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable-character table used by the BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges() -> list[str]:
    text = lzma.decompress(ASSET.read_bytes()).decode("utf-8")
    return [line for line in text.split("\n") if line]


def _cache_root() -> Path:
    base = os.environ.get("KILN_CACHE")
    if base:
        return Path(base)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"kiln-cache-{uid}"


@lru_cache(maxsize=4)
def tokenizer_folder(pad_token: str = PAD_EOS) -> Path:
    """A folder holding vocab.json, merges.txt and tokenizer_config.json.

    Written once per cache root (atomically: concurrent test workers may race).
    """
    digest = hashlib.sha256(ASSET.read_bytes() + pad_token.encode()).hexdigest()[:12]
    folder = _cache_root() / f"clip-tokenizer-{digest}"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    merges = _merges()
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}: {ASSET} is damaged")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = dict(tokenizer_class="CLIPTokenizer", model_max_length=77, bos_token=BOS, eos_token=EOS,
                  unk_token=EOS, pad_token=pad_token, do_lower_case=True)
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its folder is identical
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return folder


def clip_tokenizer(pad_token: str = PAD_EOS) -> Any:
    """A transformers ``CLIPTokenizer`` (77 tokens) with the given padding token."""
    from transformers import CLIPTokenizer

    return kept(("clip", pad_token),
                lambda: CLIPTokenizer.from_pretrained(str(tokenizer_folder(pad_token)), local_files_only=True))
