"""Tokenizers built once per thread and handed out again on the next load.

Building a tokenizer is a large share of loading a text encoder: Qwen's 151k-entry BPE takes
about 0.6 s to parse and holds about 40 MB, a folder's Qwen tokenizer through ``from_pretrained``
about 2 s, while the text encoder it serves may load in less. A workflow that loads its encoder
again (another file, a LoRA-patched copy, a model manager that unloaded it) would pay it each time.

A transformers fast tokenizer sets padding and truncation on its Rust backend at every call, so
one instance must not serve two threads at once (the server runs one worker thread per GPU): each
thread keeps its own. A helper thread working for another (a job's prefetch, which loads the job's
models while the job's thread runs, and is new for every job) uses that thread's: it only loads, the
job's thread encodes (engine/helper_threads.py). What :func:`kept` returns is shared with later loads
on the same thread, so callers use it as it is and never change its settings (padding side, special
tokens). :func:`forget` lets go of them all (the model manager's full unload, ComfyUI's /free).
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable, TypeVar

from engine.helper_threads import owner

T = TypeVar("T")

#: tokenizers kept per thread, the least recently used dropped first: enough for the four a
#: HiDream job uses (CLIP-L, CLIP-G, T5, Llama) beside a Qwen one, at most ~250 MB
KEPT = 6


#: each thread's tokenizers (its owner's, see the module's note), most recently used last; dropped
#: with the thread's object
_memos: weakref.WeakKeyDictionary[threading.Thread, OrderedDict[Hashable, Any]] = weakref.WeakKeyDictionary()
#: guards the memos (forget clears other threads' ones); never held while a tokenizer is built
_lock = threading.Lock()


def kept(key: Hashable, build: Callable[[], T]) -> T:
    """The tokenizer this thread built for ``key``, else ``build()`` (kept when it succeeds)."""
    thread = owner()
    with _lock:
        memo = _memos.setdefault(thread, OrderedDict())
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
    value = build()
    with _lock:
        memo[key] = value
        while len(memo) > KEPT:
            memo.popitem(last=False)
    return value


def forget() -> None:
    """Drop every thread's tokenizers; the next load builds them again."""
    with _lock:
        for memo in _memos.values():
            memo.clear()


#: Files up to this size are hashed; a larger one (weights beside a tokenizer) counts by its size and
#: modification time: no tokenizer file comes close (Gemma's tokenizer.json, among the largest, is 33 MB)
HASHED_BYTES = 64 * 1024**2


def _files_digest(folder: Path) -> str:
    """A digest of the names and contents of the files in ``folder``: the same for two folders holding
    the same tokenizer (the hub's copies of one family's folders, a folder copied elsewhere), and
    another one as soon as a file is replaced. Hashing the files takes milliseconds (about 10 ms for
    Qwen's 11 MB), parsing them again up to seconds."""
    digest = hashlib.blake2b(digest_size=16)
    if folder.is_dir():
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0".encode())
            digest.update(path.read_bytes() if stat.st_size <= HASHED_BYTES else str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def from_folder(cls: Any, folder: Path | str, subfolder: str, **options: Any) -> Any:
    """``cls.from_pretrained(folder, subfolder=subfolder, **options)`` offline, built again only for files
    not read before on this thread (:func:`_files_digest`)."""
    root = Path(folder).resolve()
    key = ("folder", cls.__module__, cls.__qualname__, _files_digest(root / subfolder), tuple(sorted(options.items())))
    return kept(key, lambda: cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True, **options))


def folder_tokenizer(path: Path, cls: Any, fallback: Callable[[], Any], subfolder: str = "tokenizer") -> Any:
    """A diffusers folder's ``subfolder`` read by ``cls`` (:func:`from_folder`), else ``fallback()``, Kiln's
    bundled copy: the one rule every folder loader follows, so a folder that ships its own tokenizer is
    always read with it and one without still loads offline."""
    if (Path(path) / subfolder).is_dir():
        return from_folder(cls, path, subfolder)
    return fallback()
