"""The Dask side of the cluster backend: what ``kiln worker`` runs.

``kiln worker tcp://SCHEDULER:8786 --devices cuda:0,cuda:1`` starts one Dask
worker per device in this process, each with one thread, one unit of the
``kiln-<version>`` resource (so the scheduler gives it one Kiln job at a time and
never gives Kiln jobs to other Dask workers or to another Kiln version), and a
:class:`KilnWorkerPlugin` that holds what must outlive a job: the executor, the
model host (built through the node registry, so this module imports neither
torch nor the node library) and the output cache.

A job arrives as :func:`run_job` with plain data: the workflow, its parameters
and the bytes of its input files. Events go back live on the Dask event topic
:data:`TOPIC` (progress coalesced to at most :data:`PROGRESS_HZ` a second, the
last always sent); the files a node reports travel with its ``node_finished``
event; the terminal event and outcome are the task's result. Every message of
one attempt carries its ``run`` id and a sequence number, so the server drops
what a lost attempt sends late and knows when it has every event of the last.

distributed is imported here, at module level: only ``kiln worker`` and the
cluster server import this module.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from distributed import Client, Worker, WorkerPlugin, get_worker

from engine import __version__
from engine.cache import OutputCache
from engine.context import Environment, JobInfo, Paths, Settings
from engine.events import TERMINAL, Event, JobFailed, JobInterrupted, JobStarted, NodeFinished, Progress, to_wire
from engine.executor import Executor
from engine.paths import PathRefused
from engine.registry import Registry
from engine.server.job_files import file_refs
from engine.validate import WorkflowInvalid
from engine.formats import parse_document
from engine.workflow import WorkflowFormatError

log = logging.getLogger("kiln.worker")

PLUGIN_NAME = "kiln"
TOPIC = "kiln-events"
PROGRESS_HZ = 20.0
#: Scheduler metadata key under which a Kiln server announces its version.
VERSION_KEY = ["kiln", "version"]
#: Files kept in a worker's scratch output folder (cached nodes re-send theirs).
SCRATCH_FILES = 2000


def resource_name(version: str = __version__) -> str:
    """The Dask resource a Kiln worker offers and a Kiln job needs: versions never mix."""
    return f"kiln-{version}"


class VersionRefused(RuntimeError):
    """This worker and the cluster's server run different Kiln versions."""


class KilnWorkerPlugin(WorkerPlugin):
    """One Dask worker's Kiln state: environment, model host, cache, executor, interrupts."""

    name = PLUGIN_NAME

    def __init__(self, registry: Registry, data_dir: str | Path, models_dir: str | Path | None,
                 device: str | None = None, label: str = "") -> None:
        self.registry = registry
        self.data_dir, self.models_dir, self.device, self.label = Path(data_dir), models_dir, device, label
        self._interrupts: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def setup(self, worker: Worker) -> None:
        """Build the state once; a worker re-created after a lost scheduler keeps its models and cache."""
        self.worker = worker
        if getattr(self, "executor", None) is not None:
            return
        paths = Paths.under(self.data_dir, models=self.models_dir)
        self.env = Environment(paths=paths, settings=Settings())
        self.env.models = self.registry.make_model_host(self.device)
        if self.device:
            self.env.device = self.device
        self.cache = OutputCache()
        self.executor = Executor(self.registry, self.env, self.cache)

    # -- control (called through Client.run, on the worker's event loop) --------------

    def interrupt(self, job_id: str) -> bool:
        """Stop a job now running here, or refuse it at its start if it has not begun."""
        with self._lock:
            event = self._interrupts.setdefault(job_id, threading.Event())
            event.set()
            if len(self._interrupts) > 1000:  # forget old refusals; running jobs stay
                for key in list(self._interrupts)[:500]:
                    if key != job_id:
                        self._interrupts.pop(key, None)
        return True

    def hello(self) -> dict[str, Any]:
        return {"version": __version__, "device": self.env.device, "label": self.label,
                "models": str(self.env.paths.models.root)}

    # -- a job --------------------------------------------------------------------------

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        job_id = payload["job_id"]
        run_id = uuid.uuid4().hex
        with self._lock:
            interrupt = self._interrupts.setdefault(job_id, threading.Event())
        stream = _EventStream(self.worker, job_id, run_id, self.env)
        stream.send({"kind": "attempt", "worker": self.worker.address, "name": str(self.worker.name),
                     "device": self.env.device})
        try:
            return stream.result(*self._execute(payload, stream, interrupt))
        except Exception as exc:  # an engine bug: the job fails, the worker goes on
            log.exception("job %s failed inside the worker", job_id)
            event = JobFailed(job_id, message=f"internal error on worker {self.worker.name}: {exc}",
                              exception_type=type(exc).__name__)
            return stream.result("failed", {}, event, [], [])
        finally:
            with self._lock:
                self._interrupts.pop(job_id, None)
            _prune(Path(self.env.paths.output.root), SCRATCH_FILES)

    def _execute(self, payload: dict[str, Any], stream: "_EventStream", interrupt: threading.Event) -> tuple:
        job_id = payload["job_id"]
        self.env.settings.allow_url_images = bool(payload.get("allow_url_images"))
        for item in payload.get("inputs") or []:
            _write_if_changed(self.env.paths.input.resolve(item["name"]), item["data"])
        if interrupt.is_set():
            stream.emit(JobStarted(job_id))
            return "interrupted", {}, JobInterrupted(job_id), [], []
        try:
            workflow = parse_document(payload["workflow"], self.registry)
            plan = self.executor.plan(workflow, payload.get("outputs") or None)
        except (WorkflowInvalid, WorkflowFormatError) as exc:
            first = exc.errors[0] if isinstance(exc, WorkflowInvalid) else None
            # Not this job's fault but this worker's (a checkpoint it lacks): the server tries another.
            return "invalid_here", {}, JobFailed(
                job_id, node_id=getattr(first, "node_id", None), node_type=getattr(first, "node_type", None),
                input_name=getattr(first, "input_name", None), message=str(exc),
                exception_type=type(exc).__name__), [], []
        info = JobInfo(id=job_id, workflow=payload.get("prompt") or plan.api_prompt(),
                       kiln_workflow=workflow.to_kiln(), extra_pnginfo=dict(payload.get("extra_pnginfo") or {}),
                       params=dict(payload.get("params") or {}))
        outcome = self.executor.run(plan, job=info, force=bool(payload.get("force")),
                                    keep_going=bool(payload.get("keep_going")), on_event=stream.emit,
                                    interrupt=interrupt)
        return outcome.status, outcome.outputs, stream.terminal, outcome.executed, outcome.cached


class _EventStream:
    """One attempt's messages to the server: numbered, progress coalesced, files attached."""

    def __init__(self, worker: Worker, job_id: str, run_id: str, env: Environment) -> None:
        self.worker, self.job_id, self.run_id, self.env = worker, job_id, run_id, env
        self.seq = 0
        self.terminal: Event | None = None
        self._pending: Progress | None = None
        self._last_progress = 0.0

    def send(self, msg: dict[str, Any]) -> None:
        self.seq += 1
        self.worker.log_event(TOPIC, {"job": self.job_id, "run": self.run_id, "seq": self.seq, **msg})

    def emit(self, event: Event) -> None:
        if isinstance(event, TERMINAL):
            self.terminal = event  # travels with the result, after every event before it
            return
        if isinstance(event, Progress):
            self._pending = event
            if time.monotonic() - self._last_progress < 1.0 / PROGRESS_HZ:
                return
        self._flush()
        if not isinstance(event, Progress):
            self._send_event(event)

    def _flush(self) -> None:
        if self._pending is not None:
            event, self._pending = self._pending, None
            self._last_progress = time.monotonic()
            self._send_event(event)

    def _send_event(self, event: Event) -> None:
        msg: dict[str, Any] = {"kind": "event", "event": _plain(to_wire(event))}
        if isinstance(event, NodeFinished):
            msg["files"] = self._files(event.ui)
        self.send(msg)

    def _files(self, ui: Any) -> list[dict[str, Any]]:
        roots = {"output": self.env.paths.output, "temp": self.env.paths.temp}
        files = []
        for item in file_refs(ui):
            entry = {"type": item["type"], "subfolder": item.get("subfolder") or "", "filename": item["filename"]}
            try:
                entry["data"] = roots[item["type"]].resolve(item["filename"], entry["subfolder"],
                                                            must_exist=True).read_bytes()
            except (PathRefused, OSError):
                entry["data"] = None
            files.append(entry)
        return files

    def result(self, status: str, outputs: dict, terminal: Event | None, executed: list, cached: list
               ) -> dict[str, Any]:
        self._flush()
        if terminal is None:  # the executor always ends with one; never leave the server without it
            terminal = JobFailed(self.job_id, message="the job ended without an outcome")
            status = "failed"
        return {"job": self.job_id, "run": self.run_id, "seq": self.seq, "status": status,
                "outputs": _plain(outputs), "terminal": _plain(to_wire(terminal)), "executed": list(executed),
                "cached": list(cached), "worker": self.worker.address, "name": str(self.worker.name)}


def _plain(value: Any) -> Any:
    """JSON-shaped data that msgpack carries; previews' bytes kept, anything odd as a string."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    return json.loads(json.dumps(value, default=str))


def _write_if_changed(path: Path, data: bytes) -> None:
    """Keep an unchanged input file's mtime, so its cached results stay valid."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".kiln-{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _prune(folder: Path, keep: int) -> None:
    """Delete the oldest scratch outputs beyond ``keep`` files (the server holds the real ones)."""
    try:
        entries = [e for e in os.scandir(folder) if e.is_file()]
    except OSError:
        return
    if len(entries) <= keep:
        return
    entries.sort(key=lambda e: e.stat().st_mtime)
    for entry in entries[:len(entries) - keep]:
        try:
            os.unlink(entry.path)
        except OSError:
            pass


# -- functions the server calls ----------------------------------------------------------

def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """The Dask task of one Kiln job (runs in the worker's one thread)."""
    return get_worker().plugins[PLUGIN_NAME].run(payload)


def interrupt_job(job_id: str, dask_worker: Worker) -> bool:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.interrupt(job_id) if plugin is not None else False


def hello(dask_worker: Worker) -> dict[str, Any] | None:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.hello() if plugin is not None else None


def clear_cache(dask_worker: Worker) -> dict[str, int]:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        return {}
    before = plugin.cache.stats()
    plugin.cache.clear()
    return before


def cache_stats(dask_worker: Worker) -> dict[str, int]:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.cache.stats() if plugin is not None else {}


def free_models(dask_worker: Worker) -> dict[str, Any]:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    host = plugin.env.models if plugin is not None else None
    if host is None:
        return {"unloaded": 0}
    return {"unloaded": host.unload_all(), "models": host.stats()}


# -- kiln worker ---------------------------------------------------------------------------

def _listen_host(address: str) -> str | None:
    """Loopback when the scheduler is on loopback; otherwise let Dask pick the reachable interface."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return "127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else None


async def check_scheduler(address: str, timeout: float) -> str | None:
    """Connect once: raises OSError when the scheduler cannot be reached; returns the server's Kiln version."""
    try:
        client = await Client(address, asynchronous=True, timeout=timeout, name="kiln-worker-check")
    except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
        raise OSError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({exc})") from None
    try:
        return await client.get_metadata(VERSION_KEY, None)
    finally:
        await client.close()


async def serve(address: str, registry: Registry, devices: list[str | None], data_dir: str | Path,
                models_dir: str | Path | None, *, name: str | None = None, host: str | None = None,
                timeout: float = 10.0, version: str = __version__) -> None:
    """Run one Dask worker per device until the process is stopped.

    The first connection must succeed within ``timeout`` (a wrong address is an
    error, not a hang). When the scheduler later goes away the Dask workers
    close; they are then started again, with the same models and caches, as
    soon as a scheduler answers at the address.
    """
    host = host or _listen_host(address)
    base = name or f"kiln-{os.uname().nodename}-{os.getpid()}"
    labels = [base if len(devices) == 1 else f"{base}-{i}" for i in range(len(devices))]
    plugins = [KilnWorkerPlugin(registry, Path(data_dir) / label, models_dir, device, label)
               for label, device in zip(labels, devices)]
    first = True
    while True:
        try:
            server_version = await check_scheduler(address, timeout)
        except OSError as exc:
            if first:
                raise
            log.warning("%s; retrying", exc)
            await asyncio.sleep(1.0)
            continue
        if server_version is not None and server_version != version:
            raise VersionRefused(f"this worker runs Kiln {version} but the server on {address} runs Kiln "
                                 f"{server_version}: install the same Kiln version on both")
        workers = [Worker(address, nthreads=1, name=label, resources={resource_name(version): 1},
                          plugins=(plugin,), host=host, dashboard=False, dashboard_address=f"{host or ''}:0",
                          memory_limit=0, local_directory=str(Path(data_dir) / label / "dask"), validate=False)
                   for label, plugin in zip(labels, plugins)]
        await asyncio.gather(*workers)
        for w in workers:
            print(f"Kiln worker {w.name} on {w.address} (device {w.plugins[PLUGIN_NAME].env.device}), "
                  f"scheduler {address}", flush=True)
        first = False
        try:
            await asyncio.gather(*(w.finished() for w in workers))
        finally:
            await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        log.warning("the scheduler at %s went away; reconnecting", address)
