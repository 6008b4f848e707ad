"""The T5 v1.1 tokenizer FLUX's T5-XXL encoder needs, built offline from data Kiln ships.

A ComfyUI-style ``t5xxl_*.safetensors`` file carries no tokenizer, and
transformers would fetch one from a hub. Kiln ships Google's SentencePiece
vocabulary in the ``tokenizers`` JSON form (``nodes/assets/t5-tokenizer``,
xz-compressed, 400 KB; Apache-2.0, see its README) inside the package, so an
installed Kiln needs no extra data folder. At first use it is unpacked into the
same cache folder as the CLIP tokenizer (``$KILN_CACHE`` or the temp dir) and
loaded with ``T5TokenizerFast.from_pretrained``. A diffusers FLUX folder uses
its own ``tokenizer_2/`` instead.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from nodes.checkpoint.tokenizer import _cache_root
from nodes.checkpoint.tokenizer_memo import kept

ASSET = Path(__file__).resolve().parent.parent / "assets" / "t5-tokenizer"
#: sha256 of the unpacked tokenizer.json (the README of the data states it).
TOKENIZER_SHA256 = "6cd1badb7467cdab971403bbeb1945070ca385652385a2b6549f672b08089dfc"


@lru_cache(maxsize=1)
def t5_tokenizer_folder() -> Path:
    """A folder with tokenizer.json and its two configs, written once per cache root."""
    packed = (ASSET / "tokenizer.json.xz").read_bytes()
    folder = _cache_root() / f"t5-tokenizer-{hashlib.sha256(packed).hexdigest()[:12]}"
    if (folder / "tokenizer.json").is_file():
        return folder
    data = lzma.decompress(packed)
    if hashlib.sha256(data).hexdigest() != TOKENIZER_SHA256:
        raise RuntimeError(f"{ASSET / 'tokenizer.json.xz'} is damaged (checksum mismatch)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    (tmp / "tokenizer.json").write_bytes(data)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(ASSET / name, tmp / name)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def t5_tokenizer() -> Any:
    """A transformers ``T5TokenizerFast`` over the shipped vocabulary."""
    from transformers import T5TokenizerFast

    return kept("t5", lambda: T5TokenizerFast.from_pretrained(str(t5_tokenizer_folder()), local_files_only=True))
