"""Call one node function directly with a real NodeContext (for node-level tests).

Workflow-level behaviour (signatures, caching) is covered through the Executor
elsewhere; this is for asserting on one node's outputs, errors and messages.
"""
from __future__ import annotations

from typing import Any

from engine.context import Environment, JobInfo, NodeContext
from engine.node import NodeSpec, Result


class Called:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.progress: list[tuple[int, int]] = []
        self.ui: dict[str, Any] = {}


def call(spec: NodeSpec, env: Environment, record: Called | None = None, **inputs: Any) -> tuple:
    """Run ``spec`` with ``inputs``; returns its outputs tuple (messages go to ``record``)."""
    rec = record if record is not None else Called()
    ctx = NodeContext(env=env, job=JobInfo(id="test"), node_id="1", node_type=spec.type,
                      _progress=lambda v, m, p=None: rec.progress.append((v, m)),
                      _is_interrupted=lambda: False, _message=rec.messages.append)
    out = spec.fn(ctx, **inputs)
    if isinstance(out, Result):
        rec.ui = out.ui
        out = out.outputs
    return tuple(out)
