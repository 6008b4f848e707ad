"""The in-process worker: takes jobs from the durable store, runs them, records the outcome.

Execution runs off the event loop, one thread ("lane") per device, so the API
answers while a sampler runs. Each lane owns its model host (from
``registry.make_model_host(device)``), its output cache and an Environment copy
carrying both, so nodes place models on their lane's device and two lanes never
share a loaded model or a cached handle that points into another lane's host.
The worker is deliberately narrow (claim a job, report its events, finish it):
:class:`engine.server.cluster.ClusterWorker` is the other backend, sending jobs
to Dask workers, behind the same methods.

Nothing a job does may stop the worker: validation problems found at run time
(a file deleted since submission), node failures and bugs in the engine all end
as a ``failed`` job with a reason, and the loop takes the next one.

Ordering guarantee for clients: a job's terminal event (success, error,
interrupted) is published only after its outcome is committed to the store, so a
client that reads ``/history`` when it sees ``executing`` with node null always
finds the finished job.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import traceback as tb
from typing import Any, Callable

from engine.cache import OutputCache
from engine.context import Environment, JobInfo
from engine.events import TERMINAL, Event, JobFailed, JobStarted, NodeFailed, NodeMessage, NodeStarted, Progress
from engine.executor import Executor
from engine.registry import Registry
from engine.server import batching
from engine.server import comfy_messages as cm
from engine.server.handoff import Handed, Inbox
from engine.server.loop_calls import LoopCalls
from engine.server.store import CANCELLED, FAILED, INTERRUPTED, RUNNING, SUCCEEDED, JobRecord, JobStore
from engine.validate import Plan, WorkflowInvalid
from engine.formats import parse_document
from engine.workflow import WorkflowFormatError

log = logging.getLogger(__name__)

#: Called from a worker thread with every event of a job (after the store is updated
#: for terminal ones). The app hands them to the event loop.
EventSink = Callable[[JobRecord, Event], None]

_STATUS = {"succeeded": SUCCEEDED, "failed": FAILED, "interrupted": INTERRUPTED}


class _Lane:
    """One thread, its device's environment, executor and cache, and what it is running now."""

    def __init__(self, name: str, env: Environment, cache: OutputCache, registry: Registry) -> None:
        self.name = name
        self.env = env
        self.cache = cache
        self.executor = Executor(registry, env, cache)
        self.thread: threading.Thread | None = None
        self.job_id: str | None = None
        #: Between jobs: a submission handed to this lane is run before it claims the next job
        #: (engine.server.handoff); one that waits behind another's long validation goes to a
        #: pool thread after handoff.FALLBACK_S.
        self.idle = False
        self.interrupt = threading.Event()
        #: The other jobs running with ``job_id`` as one batch (engine.server.batching), with their interrupts.
        self.followers: dict[str, threading.Event] = {}


class Worker:
    def __init__(self, store: JobStore, registry: Registry, env: Environment, *,
                 cache: OutputCache | None = None, devices: list[str] | None = None,
                 on_event: EventSink | None = None, on_queue_change: Callable[[], None] | None = None,
                 poll_s: float = 1.0, traceback_chars: int = 0,
                 wants_previews: Callable[[JobRecord], bool] = lambda job: True, batch_jobs: int = 1,
                 to_loop: LoopCalls | None = None) -> None:
        self.store, self.registry, self.env = store, registry, env
        #: The app's calls onto the loop (the same that ``on_event`` uses): a lane that runs a
        #: handed submission holds them until its job ends or does real work (engine.server.handoff).
        self.to_loop = to_loop
        #: Submissions a lane stored itself (handed over by :meth:`offer`), for tests and diagnostics.
        self.stored_on_lanes = 0
        #: At most this many queued jobs that differ only in what their nodes batch (seeds) run
        #: together (engine.server.batching); 1 runs every job alone.
        self.batch_jobs = max(1, int(batch_jobs))
        #: Whether a job's previews reach its client (engine.server.previews' rule, given by the app):
        #: when not, its nodes are told to make none.
        self.wants_previews = wants_previews
        #: Tracebacks always go to the server log; to the job's record (and its clients)
        #: only when this is positive (``kiln serve --debug``), cut to this many characters.
        self.traceback_chars = traceback_chars
        self.on_event = on_event or (lambda job, event: None)
        self.on_queue_change = on_queue_change or (lambda: None)
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress: dict[str, dict[str, Any]] = {}
        self._inbox = Inbox()
        #: Set by :meth:`warm_up`; the first lane runs it before it next claims a job.
        self._warming: Callable[[], None] | None = None
        self._on_lane = threading.local()
        #: Without explicit devices, one lane whose model host picks the best device
        #: lazily, at the first job (finding it imports torch, which startup must not pay for).
        self._pick_device = not devices
        if not devices:
            self.lanes = [_Lane("kiln-worker-0", env, cache if cache is not None else OutputCache(), registry)]
        else:
            self.lanes = [_Lane(f"kiln-worker-{i}-{device}", lane_environment(env, registry, device),
                                OutputCache(cache.budget_bytes) if cache is not None else OutputCache(), registry)
                          for i, device in enumerate(devices)]

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        for lane in self.lanes:
            lane.thread = threading.Thread(target=self._loop, args=(lane,), name=lane.name, daemon=True)
            lane.thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_threads)

    def stop_threads(self, timeout: float = 5.0) -> None:
        """Ask every lane to stop after (interrupting) its current job."""
        self._stop.set()
        self._wake.set()
        for lane in self.lanes:
            lane.interrupt.set()
            for interrupt in list(lane.followers.values()):
                interrupt.set()
        for lane in self.lanes:
            if lane.thread is not None:
                lane.thread.join(timeout)

    def warm_up(self, imports: Callable[[], None]) -> None:
        """Have the first lane find the device and run ``imports`` (Registry.warm_up) before it next
        claims a job. ``kiln serve`` asks once it listens: the model libraries' imports (seconds) are
        then paid while the server waits for work, on the lane that runs the first job, and that
        job starts at once. A job queued meanwhile waits for them, as it would have waited for its
        own imports."""
        self._warming = imports
        self._wake.set()

    def _warm(self, lane: _Lane, imports: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            self._resolve_device(lane)
            imports()
        except Exception:  # the first job imports what it needs and reports what fails
            log.exception("warming up failed")
            return
        log.info("model libraries imported in %.1f s, before the first job", time.monotonic() - started)

    def wake(self) -> None:
        """A job was queued: stop waiting for the next poll. The only lane, when it stored the job
        itself, claims next anyway (an extra wake would cost it a useless turn just when the next
        submission comes)."""
        if len(self.lanes) > 1 or not getattr(self._on_lane, "yes", False):
            self._wake.set()

    def add_job(self, add: Callable[[bool], JobRecord]) -> JobRecord:
        """Store a submitted job through ``add(start)`` (JobStore.add). On a lane running the
        submissions handed to it between jobs, the first is written as running and is this lane's
        job at once (under the claim lock, so a cancel finds it running here): its queued row and
        its claim in one commit. Anywhere else, or when a job waits ahead of it, it is queued."""
        lane = getattr(self._on_lane, "starting", None)
        if lane is None:
            return add(False)
        with self._lock:
            job = add(True)
            if job.status == RUNNING:
                lane.job_id = job.id
                lane.interrupt = threading.Event()
                self._on_lane.starting, self._on_lane.started = None, job
        return job

    def offer(self, fn: Callable[[], Any]) -> Handed | None:
        """Hand a submission to an idle lane, which runs it before it next claims; None when every
        lane is busy (the caller runs it elsewhere). See engine.server.handoff."""
        if self._stop.is_set() or not any(lane.idle for lane in self.lanes):
            return None
        item = Handed(fn, self.to_loop.call if self.to_loop is not None else None)
        self._inbox.put(item)
        self._wake.set()
        return item

    # -- control ------------------------------------------------------------------------

    def running(self) -> list[str]:
        with self._lock:
            return [job_id for lane in self.lanes if lane.job_id is not None
                    for job_id in (lane.job_id, *lane.followers)]

    def progress(self, job_id: str) -> dict[str, Any] | None:
        return self._progress.get(job_id)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job or interrupt a running one.

        Returns "cancelled", "interrupting", or None when the job is neither queued
        nor running here. Claiming and cancelling share a lock, so a job is never
        lost between "queued" and "running".
        """
        with self._lock:
            if self.store.cancel_queued(job_id):
                result = CANCELLED
            else:
                result = None
                for lane in self.lanes:
                    if lane.job_id == job_id:
                        lane.interrupt.set()
                        result = "interrupting"
                    elif job_id in lane.followers:
                        lane.followers[job_id].set()
                        result = "interrupting"
        if result == CANCELLED:
            self.on_queue_change()
        return result

    def interrupt_all(self) -> list[str]:
        """Interrupt every running job (ComfyUI's global /interrupt)."""
        with self._lock:
            ids = []
            for lane in self.lanes:
                if lane.job_id is not None:
                    lane.interrupt.set()
                    ids.append(lane.job_id)
                for job_id, interrupt in lane.followers.items():
                    interrupt.set()
                    ids.append(job_id)
            return ids

    async def clear_cache(self) -> dict[str, int]:
        """Empty every lane's output cache; returns what was held before."""
        before = self._cache_stats()
        for lane in self.lanes:
            lane.cache.clear()
        return before

    async def cache_stats(self) -> dict[str, int]:
        return self._cache_stats()

    def _cache_stats(self) -> dict[str, int]:
        """The lanes' caches added up (entries, bytes, hits, ...)."""
        total: dict[str, int] = {}
        for lane in self.lanes:
            for key, value in lane.cache.stats().items():
                total[key] = total.get(key, 0) + value
        return total

    async def free_models(self) -> dict[str, Any]:
        """Drop every idle model of every lane (ComfyUI's ``unload_models``); handles reload on next use.

        ``free`` on a host only moves weights off the GPU, which frees nothing on a
        CPU machine and keeps every model in RAM; the routes promise to unload.
        """
        hosts = self.model_hosts()
        if not hosts:
            return {"freed": False, "reason": "no model manager"}

        def unload() -> dict[str, Any]:
            unloaded = sum(host.unload_all() for host in hosts)
            stats = [host.stats() for host in hosts]
            return {"freed": True, "unloaded": unloaded, "models": stats[0] if len(stats) == 1 else stats}
        return await asyncio.to_thread(unload)

    def model_hosts(self) -> list[Any]:
        """Every lane's model host, each once (None when the node library registered none)."""
        hosts: list[Any] = []
        for lane in self.lanes:
            if lane.env.models is not None and all(h is not lane.env.models for h in hosts):
                hosts.append(lane.env.models)
        return hosts

    def devices(self) -> list[str]:
        return [lane.env.device for lane in self.lanes]

    # -- the loop -----------------------------------------------------------------------

    def _claim(self, lane: _Lane) -> JobRecord | None:
        with self._lock:
            job = self.store.claim_next()
            if job is not None:
                lane.job_id = job.id
                lane.interrupt = threading.Event()
            return job

    def _loop(self, lane: _Lane) -> None:
        self._on_lane.yes = True
        lane.idle = True
        while not self._stop.is_set():
            if self._warming is not None and lane is self.lanes[0]:
                imports, self._warming = self._warming, None
                lane.idle = False  # submissions go to a pool thread meanwhile (engine.server.handoff)
                self._warm(lane, imports)
                lane.idle = True
            # Submissions handed to an idle lane: stored here and run next (the first is written as running
            # at once, see add_job), the loop woken at the end.
            fresh: set[str] = set()
            self._on_lane.starting, self._on_lane.started = lane, None  # see add_job
            try:
                self.stored_on_lanes += self._inbox.run_waiting(
                    before=self._hold, on_result=lambda job: fresh.add(job.id) if isinstance(job, JobRecord) else None)
            finally:
                started, self._on_lane.starting, self._on_lane.started = self._on_lane.started, None, None
            try:
                job = started if started is not None else self._claim(lane)
            except Exception:  # the database is busy or broken: retry, never die
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._flush()
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            lane.idle = False
            self.on_queue_change()
            try:
                self._run(lane, job, fresh=job.id in fresh)
            except Exception:
                log.exception("job %s: the worker failed to record it", job.id)
            finally:
                with self._lock:
                    lane.job_id = None
                self._progress.pop(job.id, None)
                # Idle before anything leaves: the client's next submission, sent when it hears of this
                # end, is then handed here rather than to a pool thread that must wake this lane again.
                lane.idle = True
                self.on_queue_change()  # queued behind the job's end, and delivered with it: one loop wake-up
                self._flush()
        lane.idle = False
        self._flush()

    def _hold(self) -> None:
        if self.to_loop is not None:
            self.to_loop.hold()

    def _flush(self) -> None:
        if self.to_loop is not None:
            self.to_loop.flush()

    def _run(self, lane: _Lane, job: JobRecord, fresh: bool = False) -> None:
        """Run one claimed job (with the queued jobs it batches with); ``fresh``: see :func:`job_plan`."""
        if self.batch_jobs > 1 and batching.run_group(self, lane, job):
            return
        report = JobReport(job, self._publish, self._progress, self._redact)
        try:
            outcome_status, outputs, error, executed, cached = self._execute(lane, job, report.event, fresh)
        except Exception as exc:  # an engine bug: the job fails, the worker goes on
            event = internal_error(job.id, exc)
            report.event(event)
            outcome_status, outputs, error, executed, cached = FAILED, {}, error_dict(self._redact(event)), [], []
        report.finish(self.store, outcome_status, outputs, error, executed, cached)

    def _redact(self, event: JobFailed) -> JobFailed:
        return redact(event, self.env.paths, self.traceback_chars)

    def _resolve_device(self, lane: _Lane) -> None:
        """At the first job without explicit devices: pick the device, and add a lane per further GPU.

        Done here rather than at startup because asking imports torch, which the
        server's one-second start must not pay for.
        """
        with self._lock:
            if not self._pick_device:
                return
            self._pick_device = False
        chosen = getattr(self.env.models, "device", None)  # imports torch: here, not at startup
        if not chosen:
            return
        self.env.device = lane.env.device = str(chosen)
        lister = getattr(self.env.models, "visible_devices", None)
        others = [d for d in (lister() if callable(lister) else []) if d.split(":")[0] == str(chosen).split(":")[0]]
        if len(others) > 1:  # "cuda" picked with several GPUs visible: lane 0 takes the first, one lane each
            self.env.device = lane.env.device = others[0]
            for i, device in enumerate(others[1:], start=1):
                extra = _Lane(f"kiln-worker-{i}-{device}", lane_environment(self.env, self.registry, device),
                              OutputCache(lane.cache.budget_bytes), self.registry)
                with self._lock:
                    self.lanes.append(extra)
                if not self._stop.is_set():
                    extra.thread = threading.Thread(target=self._loop, args=(extra,), name=extra.name, daemon=True)
                    extra.thread.start()

    def _execute(self, lane: _Lane, job: JobRecord, sink: Callable[[Event], None], fresh: bool = False) -> tuple:
        if self._pick_device:
            self._flush()  # finding the device imports torch: the held reply must not wait for that
        self._resolve_device(lane)
        try:
            plan = job_plan(self.store, self.registry, lane.executor, job, fresh=fresh)
        except (WorkflowInvalid, WorkflowFormatError) as exc:
            # Valid when submitted, not any more (a file was deleted, a model removed).
            first = exc.errors[0] if isinstance(exc, WorkflowInvalid) else None
            sink(JobStarted(job.id))
            event = JobFailed(job.id, node_id=getattr(first, "node_id", None),
                              node_type=getattr(first, "node_type", None),
                              input_name=getattr(first, "input_name", None),
                              message=f"the workflow is no longer valid: {exc}", exception_type=type(exc).__name__)
            sink(event)
            return FAILED, {}, error_dict(event), [], []
        info = self._job_info(job, plan)
        outcome = lane.executor.run(plan, job=info, force=job.force, on_event=sink, interrupt=lane.interrupt,
                                    keep_going=job.keep_going)
        error = error_dict(self._redact(outcome.error)) if outcome.error is not None else None
        return _STATUS[outcome.status], outcome.outputs, error, outcome.executed, outcome.cached

    def _job_info(self, job: JobRecord, plan: Any) -> JobInfo:
        """What the job's nodes may read about it (SaveImage embeds the workflow)."""
        return JobInfo(id=job.id, workflow=job.prompt or plan.api_prompt(), kiln_workflow=plan.workflow.to_kiln(),
                       extra_pnginfo=dict(job.extra_data.get("extra_pnginfo") or {}), params=job.params,
                       previews=self.wants_previews(job))

    def _publish(self, job: JobRecord, event: Event) -> None:
        if isinstance(event, (NodeStarted, Progress, NodeMessage)):
            self._flush()  # a node does real work: from here on its events flow live
        try:
            self.on_event(job, event)
        except Exception:
            log.exception("publishing an event of job %s failed", job.id)


def job_plan(store: JobStore, registry: Registry, executor: Executor, job: JobRecord, *,
             fresh: bool = False) -> Plan:
    """The plan to run a claimed job with: the one its submission validated in this process, if
    it may still run (:meth:`Executor.replan`), else a fresh validation of the stored workflow
    (a job restored after a restart). Raises what validation raises.

    ``fresh``: the calling lane validated and stored this very job in the same turn, just before
    claiming it (engine.server.handoff), so nothing ran in between that could have changed what
    validation read; its plan is used without checking the files and budget a second time."""
    handed = store.handed_plan(job.id)
    if handed is not None:
        return handed if fresh else executor.replan(handed)
    return executor.plan(parse_document(job.workflow, registry), job.outputs_to_execute or None)


def redact(event: Any, paths: Any, traceback_chars: int) -> Any:
    """A failure (JobFailed, or NodeFailed of a job that keeps going) as clients and the record see
    it: server paths named by folder, the traceback (logged by :class:`JobReport`) kept only as far
    as ``traceback_chars`` allows."""
    event = dataclasses.replace(event, message=paths.scrub(event.message),
                                traceback=bounded_traceback(event.traceback, traceback_chars))
    if getattr(event, "failures", None):
        event.failures = [{**f, "message": paths.scrub(str(f.get("message", "")))} for f in event.failures]
    return event


def bounded_traceback(lines: list[str], limit: int) -> list[str]:
    """The last lines of a traceback that fit in ``limit`` characters (the end says most).

    Each line is first cut to an eighth of the limit, so one huge exception message
    cannot push out the frames that say where it came from.
    """
    kept: list[str] = []
    size = 0
    longest = max(200, limit // 8)
    clipped = [line if len(line) <= longest else line[:longest] + "...\n" for line in lines]
    for line in reversed(clipped):
        if size + len(line) > limit:
            if not kept and limit > 0:
                kept.append("..." + line[-(limit - 3):])
            break
        kept.append(line)
        size += len(line)
    if kept and (len(kept) < len(lines) or clipped != lines):
        kept.append("... (traceback shortened; the server log has all of it)\n")
    return kept[::-1]


def lane_environment(env: Environment, registry: Registry, device: str) -> Environment:
    """A copy of ``env`` for one device: the same folders and settings, its own model host."""
    return dataclasses.replace(env, device=device, models=registry.make_model_host(device, env.settings))


class JobReport:
    """What happens to one job's events on the server, whichever backend ran it.

    Progress is kept for ``GET /api/jobs/{id}`` (the hot path: a sampler may tick
    thousands of times), history messages are collected for ``/history``, and the
    terminal event is held back until :meth:`finish` has committed the outcome,
    so a client that reads history on "executing null" always finds the job done.
    """

    def __init__(self, job: JobRecord, publish: Callable[[JobRecord, Event], None],
                 progress: dict[str, dict[str, Any]],
                 redact: Callable[[JobFailed], JobFailed] = lambda event: event) -> None:
        self.job, self._publish, self._progress, self._redact = job, publish, progress, redact
        self.history: list[list[Any]] = []
        self.held: list[Event] = []
        self.failures_logged = False

    def event(self, event: Event) -> None:
        if isinstance(event, (JobFailed, NodeFailed)):
            if event.traceback and not (isinstance(event, JobFailed) and self.failures_logged):
                self.failures_logged = isinstance(event, NodeFailed)  # a job that kept going: each once
                log.error("job %s failed at node %s (%s):\n%s", self.job.id, event.node_id, event.node_type,
                          "".join(event.traceback).rstrip())
            event = self._redact(event)
        if isinstance(event, Progress):
            self._progress[self.job.id] = {"node_id": event.node_id, "value": event.value, "max": event.max}
        else:
            self.history.extend([name, data] for name, data in cm.to_comfy(event) if name in cm.HISTORY_MESSAGES)
        if isinstance(event, TERMINAL):
            self.held.append(event)
        else:
            self._publish(self.job, event)

    def restart(self) -> None:
        """A new attempt begins (its worker was lost): its history replaces the previous one's."""
        self.history.clear()
        self.held.clear()

    def finish(self, store: JobStore, status: str, outputs: dict | None, error: dict | None,
               executed: list | None, cached: list | None) -> None:
        """Commit the outcome, then publish the held terminal event."""
        store.finish(self.job.id, status, outputs=outputs, error=error, messages=self.history,
                     executed=executed, cached=cached)
        for event in self.held:
            self._publish(self.job, event)


def internal_error(job_id: str, exc: BaseException, message: str | None = None) -> JobFailed:
    """The event of a job that failed outside any node (an engine bug, a lost worker)."""
    return JobFailed(job_id, message=message or f"internal error: {exc}", exception_type=type(exc).__name__,
                     traceback=tb.format_exception(type(exc), exc, exc.__traceback__))


def error_dict(event: JobFailed) -> dict[str, Any]:
    return {"node_id": event.node_id, "node_type": event.node_type, "input_name": event.input_name,
            "message": event.message, "exception_type": event.exception_type, "traceback": list(event.traceback),
            "failures": list(event.failures), "blocked": list(event.blocked)}

