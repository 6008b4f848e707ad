"""Calls from worker threads onto the event loop, in order, with one wake-up per burst.

A cached job sends its whole life (started, cached, finished, two queue counts)
within a millisecond. Handing each to ``loop.call_soon_threadsafe`` wrote to the
loop's wake-up socket and ran a loop iteration per message; queued here, a burst
costs one wake-up and the loop delivers it in one go, in the order it was made.

A worker lane that stores a submission and runs it at once (engine.server.handoff)
goes further: between :meth:`hold` and :meth:`flush` its calls (the reply, then the
job's events) only queue, so a job that is done within that window wakes the loop
once, at its end, and the loop does not compete with the lane for the GIL (and, on a
busy machine, for a core) while it runs. The lane flushes as soon as a node starts
real work, so a long job's events still flow live.
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
        self._holding = threading.local()

    def hold(self) -> None:
        """Queue this thread's calls without waking the loop until :meth:`flush` (same thread)."""
        self._holding.on = True

    def flush(self) -> None:
        """End this thread's :meth:`hold`: one wake-up delivers everything queued, in order."""
        if not getattr(self._holding, "on", False):
            return
        self._holding.on = False
        with self._lock:
            loop = self._loop
            if loop is None or loop.is_closed() or self._scheduled or not self._calls:
                return
            self._scheduled = True
        self._schedule(loop)

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
            if self._scheduled or getattr(self._holding, "on", False):
                return  # a drain is on its way and will take this one too, or the flush will
            self._scheduled = True
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
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
