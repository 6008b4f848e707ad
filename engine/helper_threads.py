"""Threads that work on behalf of another one.

A job's prefetch loads its models in a thread of its own while the job's thread runs the nodes
before them (engine/executor.py), and that thread is new for every job. What a node keeps per
thread for later loads (the tokenizers of nodes/checkpoint/tokenizer_memo.py) must therefore be
kept for the job's thread, the one that lives on: :func:`owner` names it, for any thread.
"""
from __future__ import annotations

import threading
from typing import Callable

_OWNER = "kiln_owner"


def start_helper(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread running ``target`` on behalf of the current thread (its :func:`owner`)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    setattr(thread, _OWNER, owner())
    thread.start()
    return thread


def owner(thread: threading.Thread | None = None) -> threading.Thread:
    """The thread that ``thread`` (the current one by default) works for: the thread that started it
    through :func:`start_helper` (or that thread's owner), else itself."""
    thread = thread or threading.current_thread()
    return getattr(thread, _OWNER, thread)
