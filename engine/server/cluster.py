"""The cluster backend: ``kiln serve --cluster tcp://HOST:PORT`` runs jobs on Dask workers.

The SQLite store stays the one truth for jobs and history; Dask only carries
work. The server claims a queued job only when a Kiln worker is idle, so queued
jobs stay queued (cancellable, reorderable) in the store and survive the loss of
the scheduler. Each claimed job becomes one Dask task (:func:`run_job` on a
``kiln worker``), events come back live on a Dask event topic, and the outcome is
committed to the store before its terminal event is published (the in-process
worker's rule, kept by the shared :class:`engine.server.worker.JobReport`).

Routing by warmth (:mod:`engine.server.cluster_warmth`): a job goes to the idle worker
that most recently computed most of its nodes (its checkpoint loader, its text
encodings, its VAE encoding), else to the idle worker that has waited longest. The
task's worker restriction is loose, so when that worker dies the scheduler re-runs the
task on another one; after ``max_attempts`` lost workers the job fails with that reason.

A worker that cannot run a job (a checkpoint missing from its models folder)
answers "invalid here"; the job then goes to another worker, and fails naming
each worker's reason once none is left.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from engine import __version__
from engine.context import Environment
from engine.events import Event, JobFailed, JobFinished, JobInterrupted, JobStarted, from_wire
from engine.cache import OutputCache
from engine.executor import Executor, structural_signatures
from engine.registry import Registry
from engine.server import cluster_worker as cw
from engine.server.cluster_warmth import WarmthMap
from engine.server.job_files import JobFiles, input_files
from engine.server.store import CANCELLED, FAILED, INTERRUPTED, SUCCEEDED, JobRecord, JobStore
from engine.server.worker import EventSink, JobReport, error_dict, job_plan, redact
from engine.validate import WorkflowInvalid

log = logging.getLogger("kiln.cluster")

_STATUS = {"succeeded": SUCCEEDED, "failed": FAILED, "interrupted": INTERRUPTED}
#: How long the server waits for a finished attempt's last events to arrive.
EVENT_GRACE_S = 10.0


class ClusterUnreachable(OSError):
    """The scheduler did not answer within the timeout."""


async def connect(address: str, timeout: float) -> Any:
    """An asynchronous Dask client on the current event loop, or :class:`ClusterUnreachable`."""
    from distributed import Client

    try:
        return await Client(address, asynchronous=True, timeout=timeout, name="kiln-server")
    except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
        raise ClusterUnreachable(f"cannot reach the Dask scheduler at {address} within {timeout:g} s "
                                 f"({exc})") from None


@dataclass
class _Remote:
    """One claimed job while the cluster has it."""

    job: JobRecord
    report: JobReport
    files: JobFiles
    sigs: dict[str, str]
    payload: dict[str, Any]
    future: Any = None
    run: str | None = None
    worker: str | None = None  # address of the worker running (or asked to run) it
    attempts: int = 0
    deaths: int = 0
    received: int = 0
    excluded: dict[str, str] = field(default_factory=dict)  # worker address -> why it cannot run the job
    interrupted: bool = False
    abandoned: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ClusterWorker:
    """The worker interface (start, stop, wake, cancel, ...) over a Dask cluster."""

    def __init__(self, store: JobStore, registry: Registry, env: Environment, *, address: str,
                 on_event: EventSink | None = None, on_queue_change: Callable[[], None] | None = None,
                 max_attempts: int = 3, connect_timeout: float = 10.0, poll_s: float = 0.5,
                 traceback_chars: int = 0) -> None:
        self.store, self.registry, self.env = store, registry, env
        #: Plans jobs here (routing needs their structural signatures); it never runs one.
        self._planner = Executor(registry, env, OutputCache(0))
        self.address, self.max_attempts = address, max_attempts
        self.connect_timeout, self.poll_s = connect_timeout, poll_s
        self.traceback_chars = traceback_chars
        self.on_event = on_event or (lambda job, event: None)
        self.on_queue_change = on_queue_change or (lambda: None)
        self.client: Any = None
        self._jobs: dict[str, _Remote] = {}
        self._waiting: deque[_Remote] = deque()
        self._workers: dict[str, dict[str, Any]] = {}  # address -> scheduler identity, Kiln workers of our version
        self._busy: dict[str, str] = {}  # address -> job id
        self._warm = WarmthMap()
        self._last_used: dict[str, float] = {}
        self._refused: dict[str, str] = {}
        self._progress: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._refreshed = 0.0
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop())

    async def _connect(self) -> None:
        self.client = await connect(self.address, self.connect_timeout)
        await self.client.set_metadata(cw.VERSION_KEY, __version__)
        self.client.subscribe_topic(cw.TOPIC, self._on_message)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:  # closing a client whose scheduler is gone
                log.debug("closing the Dask client failed", exc_info=True)

    def wake(self) -> None:
        self._wake.set()

    # -- control ------------------------------------------------------------------------

    def running(self) -> list[str]:
        return list(self._jobs)

    def progress(self, job_id: str) -> dict[str, Any] | None:
        return self._progress.get(job_id)

    def cancel(self, job_id: str) -> str | None:
        if self.store.cancel_queued(job_id):
            self.on_queue_change()
            return CANCELLED
        remote = self._jobs.get(job_id)
        if remote is None:
            return None
        remote.interrupted = True
        if remote.future is None:  # claimed but waiting for a suitable worker: stop it here
            self._end(remote, "interrupted", {}, JobInterrupted(job_id), [], [])
        else:
            self._spawn(self._broadcast(cw.interrupt_job, job_id))
        return "interrupting"

    def interrupt_all(self) -> list[str]:
        ids = list(self._jobs)
        for job_id in ids:
            self.cancel(job_id)
        return ids

    async def clear_cache(self) -> dict[str, int]:
        before = _add_up((await self._broadcast(cw.clear_cache)).values())
        self._warm.clear()
        return before

    async def cache_stats(self) -> dict[str, int]:
        return _add_up((await self._broadcast(cw.cache_stats)).values())

    async def free_models(self) -> dict[str, Any]:
        answers = await self._broadcast(cw.free_models)
        return {"freed": True, "unloaded": sum(int(a.get("unloaded", 0)) for a in answers.values()),
                "models": {str(self._workers.get(addr, {}).get("name", addr)): a.get("models")
                           for addr, a in answers.items()}}

    def devices(self) -> list[str]:
        return [str(ident.get("name", addr)) for addr, ident in sorted(self._workers.items())]

    def workers(self) -> dict[str, Any]:
        """What the server knows of the cluster: its Kiln workers, those refused, and who runs what."""
        return {"scheduler": self.address, "version": __version__,
                "workers": [{"address": a, "name": str(i.get("name", a)), "job": self._busy.get(a)}
                            for a, i in sorted(self._workers.items())],
                "refused": dict(self._refused)}

    async def _broadcast(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """Run ``fn`` on every Kiln worker; answers by address (workers that fail to answer are left out)."""
        if not self._workers or self.client is None:
            return {}
        answers = await self.client.run(fn, *args, workers=list(self._workers), on_error="return")
        return {addr: a for addr, a in answers.items() if not isinstance(a, BaseException) and a is not None}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the dispatch loop --------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            try:
                if self.client is None or self.client.status != "running":
                    await self._reconnect()
                else:
                    if time.monotonic() - self._refreshed >= self.poll_s:  # not on every submission
                        await self._refresh_workers()
                        self._refreshed = time.monotonic()
                    self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive anything a cluster does
                log.exception("cluster dispatch failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def _reconnect(self) -> None:
        """The scheduler went away: running jobs go back to the queue, then connect again."""
        for remote in list(self._jobs.values()):
            remote.abandoned = True
            self._jobs.pop(remote.job.id, None)
            self._progress.pop(remote.job.id, None)
            if self.store.requeue(remote.job.id):
                log.warning("job %s: the scheduler was lost while it ran; it is queued again", remote.job.id)
        self._waiting.clear()
        self._busy.clear()
        self._workers.clear()
        self._refreshed = 0.0
        self.on_queue_change()
        old, self.client = self.client, None
        if old is not None:
            try:
                await old.close()
            except Exception:
                pass
        try:
            await self._connect()
            log.warning("reconnected to the Dask scheduler at %s", self.address)
        except ClusterUnreachable as exc:
            log.warning("%s; retrying", exc)
            await asyncio.sleep(1.0)

    async def _refresh_workers(self) -> None:
        info = await self.client.scheduler.identity()
        mine = cw.resource_name()
        current: dict[str, dict[str, Any]] = {}
        for addr, ident in (info.get("workers") or {}).items():
            resources = ident.get("resources") or {}
            if mine in resources:
                current[addr] = ident
                continue
            theirs = [r[len("kiln-"):] for r in resources if r.startswith("kiln-")]
            if theirs and addr not in self._refused:
                self._refused[addr] = (f"worker {ident.get('name', addr)} runs Kiln {theirs[0]}, "
                                       f"this server runs Kiln {__version__}")
                log.error("refusing %s: %s", addr, self._refused[addr])
        lost = set(self._workers) - set(current)
        self._workers = current
        for addr in lost:
            self._worker_lost(addr)

    def _worker_lost(self, addr: str) -> None:
        """Count the death against the job it ran.

        When the server does not know of a job on that worker (it died before its
        "attempt" message left), the death is counted against every job whose last
        known worker is gone too: Dask moved those to some other worker.
        """
        self._warm.forget(addr)
        job_id = self._busy.pop(addr, None)
        remote = self._jobs.get(job_id) if job_id else None
        if remote is not None and remote.worker == addr:
            victims = [remote]
        else:
            victims = [r for r in self._jobs.values()
                       if r.future is not None and r.worker not in self._workers and r.worker != addr]
        for remote in victims:
            remote.deaths += 1
            log.warning("job %s: worker %s was lost while running it (%d of %d)", remote.job.id, addr,
                        remote.deaths, self.max_attempts)
            if remote.deaths >= self.max_attempts:
                self._give_up(remote, f"the job was lost with {remote.deaths} worker(s) that died while running "
                                      f"it (the last: {addr}); it is not tried again")

    def _idle(self) -> list[str]:
        return [a for a in self._workers if a not in self._busy]

    def _dispatch(self) -> None:
        """Give every idle worker a job: one waiting for a worker like it, else the next queued one."""
        for addr in sorted(self._idle(), key=lambda a: self._last_used.get(a, 0.0)):
            if addr in self._busy:  # taken by a warmer choice earlier in this round
                continue
            remote = next((r for r in self._waiting if addr not in r.excluded), None)
            if remote is not None:
                self._waiting.remove(remote)
            else:
                job = self.store.claim_next()
                if job is None:
                    continue
                self.on_queue_change()
                remote = self._prepare(job)
                if remote is None:
                    continue
            self._submit(remote, self._choose(remote, addr))

    def _choose(self, remote: _Remote, fallback: str) -> str:
        """The idle worker holding most of the job's structural signatures (ties: the longest idle)."""
        idle = sorted(self._idle(), key=lambda a: self._last_used.get(a, 0.0))
        return self._warm.choose([a for a in idle if a not in remote.excluded], remote.sigs, fallback)

    def _prepare(self, job: JobRecord) -> _Remote | None:
        report = JobReport(job, self._publish, self._progress, self._redact)
        files = JobFiles({"output": self.env.paths.output, "temp": self.env.paths.temp})
        try:
            plan = job_plan(self.store, self.registry, self._planner, job)
            inputs = input_files(job.workflow.get("nodes") or {}, self.env.paths.input)
        except Exception as exc:  # anything: a claimed job must never stay "running" with nobody on it
            first = exc.errors[0] if isinstance(exc, WorkflowInvalid) else None
            report.event(JobStarted(job.id))
            event = JobFailed(job.id, node_id=getattr(first, "node_id", None),
                              node_type=getattr(first, "node_type", None),
                              input_name=getattr(first, "input_name", None),
                              message=f"the workflow is no longer valid: {exc}", exception_type=type(exc).__name__)
            report.event(event)
            report.finish(self.store, FAILED, {}, error_dict(self._redact(event)), [], [])
            self.on_queue_change()
            return None
        payload = {"job_id": job.id, "version": __version__, "workflow": job.workflow, "prompt": job.prompt,
                   "outputs": list(job.outputs_to_execute), "force": job.force,
                   "keep_going": job.keep_going, "params": job.params,
                   "extra_pnginfo": dict(job.extra_data.get("extra_pnginfo") or {}),
                   "allow_url_images": self.env.settings.allow_url_images, "inputs": inputs}
        remote = _Remote(job, report, files, structural_signatures(plan), payload)
        self._jobs[job.id] = remote
        return remote

    def _submit(self, remote: _Remote, addr: str) -> None:
        remote.worker = addr
        self._busy[addr] = remote.job.id
        self._last_used[addr] = time.monotonic()
        key = f"kiln-job-{remote.job.id}-{len(remote.excluded)}"
        remote.future = self.client.submit(cw.run_job, remote.payload, key=key, workers=[addr],
                                           allow_other_workers=True, resources={cw.resource_name(): 1},
                                           pure=False, retries=0)
        self._spawn(self._watch(remote, remote.future))

    # -- outcomes ---------------------------------------------------------------------

    async def _watch(self, remote: _Remote, future: Any) -> None:
        try:
            result = await future
        except asyncio.CancelledError:
            if self._stopping:
                raise
            result = None
            if not remote.abandoned:  # the scheduler dropped it
                await self._lost(remote)
        except Exception as exc:
            result = None
            if not remote.abandoned:
                if type(exc).__name__ == "KilledWorker":
                    self._give_up(remote, f"the job was lost with every worker that tried it ({exc}); "
                                          "it is not tried again")
                elif self.client is None or self.client.status != "running":
                    await self._lost(remote)
                else:
                    event = JobFailed(remote.job.id, message=f"the cluster failed to run the job: {exc}",
                                      exception_type=type(exc).__name__)
                    remote.report.event(event)
                    self._end(remote, "failed", {}, event, [], [])
        finally:
            self._release(remote)
        if result is not None and not remote.abandoned:
            await self._complete(remote, result)
        self._wake.set()

    async def _lost(self, remote: _Remote) -> None:
        remote.abandoned = True
        self._forget(remote)
        if self.store.requeue(remote.job.id):
            log.warning("job %s: the cluster lost it; it is queued again", remote.job.id)
        self.on_queue_change()

    def _forget(self, remote: _Remote) -> None:
        """Drop the job from the running set, unless it was queued again and claimed anew meanwhile."""
        if self._jobs.get(remote.job.id) is remote:
            del self._jobs[remote.job.id]
            self._progress.pop(remote.job.id, None)

    def _release(self, remote: _Remote) -> None:
        if remote.worker is not None and self._busy.get(remote.worker) == remote.job.id:
            del self._busy[remote.worker]

    async def _complete(self, remote: _Remote, result: dict[str, Any]) -> None:
        terminal = from_wire(result["terminal"])
        addr = result.get("worker") or remote.worker or "?"
        if result["status"] == "invalid_here":
            remote.excluded[addr] = f"worker {result.get('name', addr)}: {getattr(terminal, 'message', '')}"
            remote.future = None
            if remote.interrupted:
                self._end(remote, "interrupted", {}, JobInterrupted(remote.job.id), [], [])
            elif all(a in remote.excluded for a in self._workers):
                event = JobFailed(remote.job.id, node_id=terminal.node_id, node_type=terminal.node_type,
                                  input_name=terminal.input_name,
                                  message="no worker can run this job: " + "; ".join(remote.excluded.values()),
                                  exception_type="NoSuitableWorker")
                remote.report.event(JobStarted(remote.job.id))
                self._end(remote, "failed", {}, event, [], [])
            else:
                self._waiting.appendleft(remote)
            return
        if remote.run is None or result["run"] != remote.run:  # its "attempt" message is late: take the result's
            self._new_attempt(remote, result["run"], addr, result.get("name", addr))
        deadline = time.monotonic() + EVENT_GRACE_S
        while remote.received < result["seq"] and time.monotonic() < deadline:
            remote.changed.clear()
            try:
                await asyncio.wait_for(remote.changed.wait(), max(0.01, deadline - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):
                pass
        if remote.received < result["seq"]:
            log.warning("job %s: %d event(s) did not arrive", remote.job.id, result["seq"] - remote.received)
        outputs = result.get("outputs") or {}
        for ui in outputs.values():
            remote.files.rename(ui)
        if isinstance(terminal, JobFinished):
            for ui in terminal.outputs.values():
                remote.files.rename(ui)
        if result["status"] == "succeeded" or result.get("executed"):
            computed = [*result.get("executed", []), *result.get("cached", [])]
            self._warm.remember(addr, [remote.sigs[n] for n in computed if n in remote.sigs])
        self._end(remote, result["status"], outputs, terminal, result.get("executed", []),
                  result.get("cached", []))

    def _end(self, remote: _Remote, status: str, outputs: dict, terminal: Event, executed: list,
             cached: list) -> None:
        """Record the outcome (commit, then publish) and forget the job."""
        remote.abandoned = True
        self._forget(remote)
        if remote in self._waiting:
            self._waiting.remove(remote)
        remote.report.event(terminal)
        error = error_dict(self._redact(terminal)) if isinstance(terminal, JobFailed) else None
        try:
            remote.report.finish(self.store, _STATUS.get(status, FAILED), outputs, error, executed, cached)
        finally:
            removed = remote.files.drop_lost_attempts()
            if removed:
                log.info("job %s: removed %d file(s) of lost attempts", remote.job.id, len(removed))
            self.on_queue_change()
            self._wake.set()

    def _give_up(self, remote: _Remote, message: str) -> None:
        if remote.future is not None and self.client is not None:
            self._spawn(self.client.cancel(remote.future))
        self._release(remote)
        event = JobFailed(remote.job.id, message=message, exception_type="WorkerLost")
        self._end(remote, "failed", {}, event, [], [])

    # -- events ---------------------------------------------------------------------------

    def _on_message(self, event: Any) -> None:
        """A message of the event topic: ``(timestamp, msg)``; runs on the event loop."""
        try:
            msg = event[1]
            remote = self._jobs.get(msg.get("job"))
            if remote is None or remote.abandoned:
                return
            if msg.get("kind") == "attempt":
                if msg["run"] != remote.run:
                    self._new_attempt(remote, msg["run"], msg.get("worker"), msg.get("name"))
                remote.received = max(remote.received, int(msg["seq"]))
            elif msg.get("run") == remote.run and msg.get("kind") == "event":
                self._event(remote, msg)
                remote.received = max(remote.received, int(msg["seq"]))
            remote.changed.set()
        except Exception:
            log.exception("a cluster event could not be handled")

    def _new_attempt(self, remote: _Remote, run: str, addr: str | None, name: str | None) -> None:
        remote.attempts += 1
        remote.run, remote.received = run, 0
        if addr:
            if remote.worker and remote.worker != addr and self._busy.get(remote.worker) == remote.job.id:
                del self._busy[remote.worker]
            remote.worker = addr
            self._busy[addr] = remote.job.id
        if name:
            self.store.set_worker(remote.job.id, str(name))
        if remote.attempts > 1:
            log.warning("job %s: attempt %d on %s", remote.job.id, remote.attempts, name or addr)
            remote.report.restart()
            remote.files.new_attempt()

    def _event(self, remote: _Remote, msg: dict[str, Any]) -> None:
        event = from_wire(msg["event"])
        for item in msg.get("files") or []:
            remote.files.place(item)
        if isinstance(event, JobStarted) or hasattr(event, "ui"):
            remote.files.rename(getattr(event, "ui", None))
        remote.report.event(event)

    def _redact(self, event: JobFailed) -> JobFailed:
        return redact(event, self.env.paths, self.traceback_chars)

    def _publish(self, job: JobRecord, event: Event) -> None:
        try:
            self.on_event(job, event)
        except Exception:
            log.exception("publishing an event of job %s failed", job.id)


def _add_up(stats: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in stats:
        for key, value in (one or {}).items():
            if isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    return total
