"""Tokenizers are built once per thread (nodes/checkpoint/tokenizer_memo.py): a second load on the same
thread gets the same object, a helper working for that thread (a job's prefetch) too, another thread its
own, and a folder whose tokenizer files change is read again."""
from __future__ import annotations

import threading

import pytest

from engine.helper_threads import start_helper
from nodes.checkpoint import tokenizer_memo
from nodes.checkpoint.tokenizer import clip_tokenizer


def _in_thread(fn, helper: bool = False):
    """``fn()`` run in another thread: one of its own, or a helper working for this one (a job's prefetch)."""
    out = []
    if helper:
        start_helper(lambda: out.append(fn()), "test-helper").join(30)
    else:
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
    return out[0]


def test_the_same_thread_gets_the_same_tokenizer_and_another_thread_its_own():
    first = clip_tokenizer()
    assert clip_tokenizer() is first
    assert clip_tokenizer("!") is not first  # another padding is another tokenizer
    other = _in_thread(clip_tokenizer)
    assert other is not first
    # the other thread's is the same tokenizer: same ids, same padding
    assert other("a photo of a cat", padding="max_length", max_length=77).input_ids == \
        first("a photo of a cat", padding="max_length", max_length=77).input_ids


def test_a_helper_thread_loads_with_the_tokenizers_of_the_thread_it_works_for():
    """A job's prefetch thread, new for every job, loads the job's models (engine/helper_threads.py): it
    finds the tokenizers the job's thread keeps, and what it builds is kept for that thread, so loading the
    model again in the next job builds none."""
    tokenizer_memo.forget()  # so that the helper below builds the "!" one (an earlier test kept it)
    mine = clip_tokenizer()
    assert _in_thread(clip_tokenizer, helper=True) is mine
    built = _in_thread(lambda: clip_tokenizer("!"), helper=True)
    assert clip_tokenizer("!") is built
    assert _in_thread(lambda: _in_thread(clip_tokenizer, helper=True), helper=True) is mine  # a helper's helper too
    assert _in_thread(clip_tokenizer) is not mine  # a thread of its own keeps its own


def test_a_failed_build_is_not_kept_and_the_oldest_is_dropped_past_the_bound():
    calls = []

    def failing():
        calls.append(1)
        raise OSError("unreadable")

    for _ in range(2):
        with pytest.raises(OSError):
            tokenizer_memo.kept(("test-failing",), failing)
    assert len(calls) == 2

    built = [tokenizer_memo.kept(("test-bound", i), object) for i in range(tokenizer_memo.KEPT + 1)]
    assert tokenizer_memo.kept(("test-bound", tokenizer_memo.KEPT), object) is built[-1]
    assert tokenizer_memo.kept(("test-bound", 0), object) is not built[0]  # dropped, built again


def test_a_folder_tokenizer_is_read_again_when_its_files_change(tmp_path):
    from transformers import CLIPTokenizer

    clip_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    first = tokenizer_memo.from_folder(CLIPTokenizer, tmp_path, "tokenizer")
    assert tokenizer_memo.from_folder(CLIPTokenizer, tmp_path, "tokenizer") is first

    clip_tokenizer("!").save_pretrained(str(tmp_path / "tokenizer"))  # the same names, other contents
    again = tokenizer_memo.from_folder(CLIPTokenizer, tmp_path, "tokenizer")
    assert again is not first
    assert (first.pad_token, again.pad_token) == ("<|endoftext|>", "!")


def test_two_folders_holding_the_same_tokenizer_share_one_build(tmp_path):
    """Keyed by the files' contents, not the folder: a copy elsewhere is not parsed again, one file
    changed anywhere in it is."""
    import shutil

    from transformers import CLIPTokenizer

    clip_tokenizer().save_pretrained(str(tmp_path / "a" / "tokenizer"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = tokenizer_memo.from_folder(CLIPTokenizer, tmp_path / "a", "tokenizer")
    assert tokenizer_memo.from_folder(CLIPTokenizer, tmp_path / "b", "tokenizer") is first
    config = tmp_path / "b" / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length": 77', '"model_max_length": 76'))
    changed = tokenizer_memo.from_folder(CLIPTokenizer, tmp_path / "b", "tokenizer")
    assert changed is not first and (first.model_max_length, changed.model_max_length) == (77, 76)


def test_a_file_too_large_to_hash_counts_by_its_size_and_modification_time(tmp_path, monkeypatch):
    """Weights beside a tokenizer are not read to key it; replacing them (a new mtime) still builds it again."""
    import os

    from transformers import CLIPTokenizer

    monkeypatch.setattr(tokenizer_memo, "HASHED_BYTES", 1024)  # the limit itself is 64 MB
    folder = tmp_path / "tokenizer"
    clip_tokenizer().save_pretrained(str(folder))
    weights = folder / "weights.safetensors"
    weights.write_bytes(b"a" * 4096)
    stamp = weights.stat().st_mtime_ns
    first = tokenizer_memo.from_folder(CLIPTokenizer, tmp_path, "tokenizer")
    weights.write_bytes(b"b" * 4096)  # other contents, same size and time: not read, so the same key
    os.utime(weights, ns=(stamp, stamp))
    assert tokenizer_memo.from_folder(CLIPTokenizer, tmp_path, "tokenizer") is first
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))
    assert tokenizer_memo.from_folder(CLIPTokenizer, tmp_path, "tokenizer") is not first


def test_a_full_unload_lets_go_of_every_threads_tokenizers():
    """ComfyUI's /free (the model manager's full unload) drops the kept tokenizers, another thread's too."""
    from nodes.runtime.models import ModelManager

    mine = clip_tokenizer()
    started, release = threading.Event(), threading.Event()
    theirs = []

    def other_thread():
        theirs.append(clip_tokenizer())
        started.set()
        release.wait(30)
        theirs.append(clip_tokenizer())

    t = threading.Thread(target=other_thread)
    t.start()
    started.wait(30)
    ModelManager(device="cpu").unload_all(collect=False)
    assert clip_tokenizer() is mine  # a test's teardown keeps them
    ModelManager(device="cpu").unload_all()
    release.set()
    t.join()
    assert clip_tokenizer() is not mine
    assert theirs[1] is not theirs[0]
