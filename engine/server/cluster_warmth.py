"""Routing by warmth: which Kiln worker of a cluster most likely holds a job's work cached.

The server cannot see a worker's cache, so it remembers, per worker, the structural
signatures (node signatures without file fingerprints, identical on every machine) of
the nodes that worker executed or found cached, newest last and bounded, and sends a
job to the idle worker holding most of that job's signatures. Ties go to the worker
that has waited longest, so idle machines share the load.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping

#: Structural signatures remembered per worker (an approximation of its cache).
WARM_ENTRIES = 20000


class WarmthMap:
    """Each worker's recently computed signatures, the oldest forgotten beyond ``limit``."""

    def __init__(self, limit: int = WARM_ENTRIES) -> None:
        self.limit = limit
        self._by_worker: dict[str, OrderedDict[str, None]] = {}

    def remember(self, worker: str, signatures: Iterable[str]) -> None:
        warm = self._by_worker.setdefault(worker, OrderedDict())
        for sig in signatures:
            warm[sig] = None
            warm.move_to_end(sig)
        while len(warm) > self.limit:
            warm.popitem(last=False)

    def forget(self, worker: str) -> None:
        """A lost worker's cache is gone with it."""
        self._by_worker.pop(worker, None)

    def clear(self) -> None:
        """Every worker's cache was emptied (the server's clear-cache request)."""
        for warm in self._by_worker.values():
            warm.clear()

    def choose(self, candidates: Iterable[str], signatures: Mapping[str, str], fallback: str) -> str:
        """The candidate holding most of ``signatures`` (node id -> signature); ``candidates``
        come longest idle first, so the first of equals wins; ``fallback`` when none is given."""
        best, best_score = fallback, -1
        for worker in candidates:
            warm = self._by_worker.get(worker, {})
            score = sum(1 for sig in signatures.values() if sig in warm)
            if score > best_score:
                best, best_score = worker, score
        return best
