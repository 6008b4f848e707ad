"""Call one node function directly with a real NodeContext (for node-level tests).

Workflow-level behaviour (signatures, caching) is covered through the Executor
elsewhere; this is for asserting on one node's outputs, errors and messages.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.context import Environment, JobInfo, NodeContext, Paths
from engine.node import NodeSpec, Result


class Recorder:
    """A bare NodeContext (no environment, no job) for calling a sampler or latent node function
    directly; it keeps the node's messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.ctx = NodeContext(env=None, job=None, node_id="1", node_type="KSampler",
                               _progress=lambda *a: None, _is_interrupted=lambda: False, _message=self.messages.append)


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


def environment_over(models_root: Path | None, tmp_path: Path) -> Iterator[Environment]:
    """Yield an Environment over ``tmp_path/data`` whose models folder is ``models_root``
    (the data folder's own when None), with its own CPU model manager (float32, so results
    compare bit for bit with CPU-built source models even on a GPU machine), unloaded after.
    A fixture body (``yield from``) for modules with their own models folder."""
    from nodes.runtime.models import ModelManager

    models = ModelManager(device="cpu")
    data = tmp_path / "data"
    paths = Paths.under(data, models=models_root) if models_root is not None else Paths.under(data)
    yield Environment(paths=paths, models=models)
    models.unload_all(collect=False)  # the test only lets go of small models; see ModelManager.unload_all


def model_in_memory(family: Any, network: Any) -> Any:
    """A MODEL handle of ``family`` over a network already in memory (no loader, no model manager)."""
    import contextlib

    from nodes.handles import ModelHandle

    return ModelHandle(family, scheduler_config={}, latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(network), _peek=lambda: network)
