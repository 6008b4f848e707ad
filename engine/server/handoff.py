"""Submissions run on an idle worker lane instead of a pool thread, each taken exactly once.

An identical resubmit is a few hundred microseconds of work spread over three
threads: the loop, a pool thread that validates and stores the job, and the
worker that claims and runs it. On a busy machine every hand-off between
threads may wait for a core, and those waits, not the work, made the tail
(issue 16: p90 5.8-7.4 ms with both cores busy). When a lane is idle, the
submission is handed to that lane: it validates and commits the job on its own
thread, then claims it straight away, one hand-off fewer, and no second
thread wanting the GIL while the job runs. The lane also holds its calls to the loop
(the reply, then the job's events: engine.server.loop_calls) until the job ends or
a node starts real work, so a cached job wakes the loop once.

Nothing here runs on the loop, so a large workflow's validation or a slow disk
still stalls no other request. A lane found idle may have started a job since
(its poll found one): the loop then runs the submission on a pool thread after
:data:`FALLBACK_S`, and whichever side takes it first runs it; the other does
nothing (:meth:`Handed.take`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from typing import Any, Callable

#: How long a handed submission may wait for its lane before a pool thread runs it instead.
FALLBACK_S = 0.02


class Handed:
    """One submission offered to a lane; run by the first of the lane and the fallback to take it."""

    def __init__(self, fn: Callable[[], Any], deliver: Callable[..., None] | None = None) -> None:
        self.fn = fn
        #: How the outcome reaches the loop: ``deliver(settle, value)``. A worker passes
        #: LoopCalls.call, so the reply waits in line with the job's events (and is flushed
        #: with them); by default the future is settled at once.
        self._deliver = deliver or (lambda settle, value: settle(value))
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._taken = False
        self._lock = threading.Lock()

    def take(self) -> bool:
        """True for the first caller only: that caller must then :meth:`run` it."""
        with self._lock:
            if self._taken:
                return False
            self._taken = True
            return True

    def run(self) -> Any:
        """Run the submission and settle the future; its result, or None when it failed. Never raises
        (a lane must survive any request)."""
        if not self.future.set_running_or_notify_cancel():
            return None  # the request went away before anyone started it
        try:
            result = self.fn()
        except BaseException as exc:  # handed to the waiting request, which answers with it
            self._deliver(self.future.set_exception, exc)
            return None
        self._deliver(self.future.set_result, result)
        return result


class Inbox:
    """Submissions waiting for an idle lane, in order."""

    def __init__(self) -> None:
        self._items: deque[Handed] = deque()

    def put(self, item: Handed) -> None:
        self._items.append(item)

    def run_waiting(self, before: Callable[[], None] = lambda: None,
                    on_result: Callable[[Any], None] = lambda result: None) -> int:
        """Run (on the calling lane's thread) every item no one has taken yet, calling ``before``
        ahead of the first and ``on_result`` with each one's result; how many ran."""
        ran = 0
        while True:
            try:
                item = self._items.popleft()
            except IndexError:
                return ran
            if item.take():
                if not ran:
                    before()
                result = item.run()
                if result is not None:
                    on_result(result)
                ran += 1


async def run_submission(offer: Callable[[Callable[[], Any]], Handed | None] | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` on an idle lane when ``offer`` hands it to one, else on a pool thread; its result."""
    item = offer(fn) if offer is not None else None
    if item is None:
        return await asyncio.to_thread(fn)
    loop = asyncio.get_running_loop()

    def fallback() -> None:
        if item.take():
            loop.run_in_executor(None, item.run)

    timer = loop.call_later(FALLBACK_S, fallback)
    try:
        return await asyncio.wrap_future(item.future)
    finally:
        timer.cancel()
