"""The typed event stream of a job.

The CLI, the server's websocket and history, and the tests all consume these same
events. ``to_dict`` gives the JSON shape (``{"type": ..., ...}``); a preview image
travels as bytes in :class:`Preview` and is left out of the JSON form, so that
transports can send it as a binary frame instead of base64.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Preview:
    data: bytes
    mime: str = "image/jpeg"
    width: int = 0
    height: int = 0
    #: A finished output image sent in a preview frame (SaveImageWebsocket), not a
    #: sampling preview: every one is delivered, in order, never replaced by a later one.
    output: bool = False


@dataclass
class Event:
    type: ClassVar[str] = "event"
    job_id: str

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Preview):
                d["preview"] = {"mime": value.mime, "width": value.width, "height": value.height}
                continue
            d[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
        return d


@dataclass
class JobStarted(Event):
    type: ClassVar[str] = "job_started"
    node_ids: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=now_ms)


@dataclass
class NodesCached(Event):
    type: ClassVar[str] = "nodes_cached"
    node_ids: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=now_ms)


@dataclass
class NodeStarted(Event):
    type: ClassVar[str] = "node_started"
    node_id: str = ""
    node_type: str = ""


@dataclass
class Progress(Event):
    type: ClassVar[str] = "progress"
    node_id: str = ""
    value: int = 0
    max: int = 0
    preview: Preview | None = None


@dataclass
class NodeMessage(Event):
    type: ClassVar[str] = "node_message"
    node_id: str = ""
    node_type: str = ""
    message: str = ""


@dataclass
class NodeFinished(Event):
    type: ClassVar[str] = "node_finished"
    node_id: str = ""
    node_type: str = ""
    ui: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0


@dataclass
class JobFinished(Event):
    type: ClassVar[str] = "job_finished"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timestamp: int = field(default_factory=now_ms)


@dataclass
class _Failure(Event):
    """Which node failed, where and why (a traceback for the log; clients get it shortened)."""

    node_id: str | None = None
    node_type: str | None = None
    input_name: str | None = None
    message: str = ""
    exception_type: str = ""
    traceback: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What a job's record keeps of each failure (no traceback: the first failure's is kept)."""
        return {"node_id": self.node_id, "node_type": self.node_type, "input_name": self.input_name,
                "message": self.message, "exception_type": self.exception_type}


@dataclass
class NodeFailed(_Failure):
    """A node failed in a job that keeps going (``keep_going``): the nodes that need its result are
    ``blocked`` and will not run; every other branch goes on. The job ends with a JobFailed."""

    type: ClassVar[str] = "node_failed"
    blocked: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=now_ms)


@dataclass
class JobFailed(_Failure):
    """The job's end after a failure. It names the (first) node that failed; a job that kept going
    past failures also lists every one (``failures``, in the order they happened) and the nodes
    they kept from running (``blocked``), and its independent branches' results are in its outputs."""

    type: ClassVar[str] = "job_failed"
    executed: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=now_ms)


@dataclass
class JobInterrupted(Event):
    type: ClassVar[str] = "job_interrupted"
    node_id: str | None = None
    node_type: str | None = None
    executed: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=now_ms)


TERMINAL = (JobFinished, JobFailed, JobInterrupted)


_BY_TYPE: dict[str, type[Event]] = {cls.type: cls for cls in (
    JobStarted, NodesCached, NodeStarted, Progress, NodeMessage, NodeFinished, NodeFailed, JobFinished, JobFailed,
    JobInterrupted)}


def to_wire(event: Event) -> dict[str, Any]:
    """The event as plain data another process can rebuild, preview bytes included (msgpack-able)."""
    d = event.to_dict()
    preview = getattr(event, "preview", None)
    if preview is not None:
        d["preview"] = asdict(preview)
    return d


def from_wire(data: dict[str, Any]) -> Event:
    """Rebuild an event sent with :func:`to_wire` (unknown keys are ignored, so older peers still parse)."""
    data = dict(data)
    cls = _BY_TYPE[data.pop("type")]
    if data.get("preview") is not None:
        data["preview"] = Preview(**data["preview"])
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
