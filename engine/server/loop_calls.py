"""Calls from worker threads onto the event loop, in order, with one wake-up per burst.

A cached job sends its whole life (started, cached, finished, two queue counts)
within a millisecond. Handing each to ``loop.call_soon_threadsafe`` wrote to the
loop's wake-up socket and ran a loop iteration per message; queued here, a burst
costs one wake-up and the loop delivers it in one go, in the order it was made.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)


class LoopCalls:
    """Runs ``fn(*args)`` on the loop set by :meth:`attach`; calls made while none is attached are dropped."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        with self._lock:
            self._loop = loop
            self._calls.clear()
            self._scheduled = False

    @property
    def attached(self) -> bool:
        loop = self._loop
        return loop is not None and not loop.is_closed()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            loop = self._loop
            if loop is None or loop.is_closed():
                return
            self._calls.append((fn, args))
            if self._scheduled:  # a drain is already on its way and will take this one too
                return
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed meanwhile: nobody is left to tell
            with self._lock:
                self._calls.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            calls = list(self._calls)
            self._calls.clear()
            self._scheduled = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # one failed delivery must not drop the ones after it
                log.exception("delivering %s from a worker failed", getattr(fn, "__name__", fn))
