"""The output cache: node results by signature, under a byte budget.

A signature is a hash of what determines a node's result (see
:func:`engine.executor.node_signature`), never of its id, so identical sub-graphs
share entries. Entries are evicted least-recently-used once the tensor bytes held
pass the budget. Models are not entries: loaders return light handles and the model
manager owns the weights.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_BUDGET = 2 * 1024**3


def value_nbytes(value: Any, _seen: set[int] | None = None) -> int:
    """Bytes held by tensors and arrays inside ``value`` (containers walked, shared ones once)."""
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    custom = getattr(value, "__kiln_nbytes__", None)
    if callable(custom):
        return int(custom())
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(value_nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(value_nbytes(v, seen) for v in value)
    nbytes = getattr(value, "nbytes", None)  # torch tensors and numpy arrays
    if isinstance(nbytes, int):
        return nbytes
    return 0


@dataclass
class CacheEntry:
    outputs: tuple
    ui: dict
    nbytes: int


class OutputCache:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, signature: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(signature)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(signature)
            self.hits += 1
            return entry

    def __contains__(self, signature: str) -> bool:
        with self._lock:
            return signature in self._entries

    def put(self, signature: str, outputs: tuple, ui: dict | None = None) -> bool:
        """Store a result; returns False when it alone is bigger than the budget."""
        nbytes = value_nbytes(outputs)
        if nbytes > self.budget_bytes:
            return False
        with self._lock:
            old = self._entries.pop(signature, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[signature] = CacheEntry(outputs, ui or {}, nbytes)
            self._bytes += nbytes
            while self._bytes > self.budget_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
