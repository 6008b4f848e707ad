"""The executor: plan -> run -> events. The only place that calls node functions.

For each node of the plan the executor computes a signature from what determines
its result (type, version, literal inputs, external fingerprint, and the
signatures of the nodes feeding it). Walking back from the output nodes, a node
runs only when a node that must run needs its result and the cache does not hold
it; everything else is served from the cache or skipped. A node's lazy inputs
(engine.node.Input.lazy) are not followed by that walk: what feeds them is produced
when the node, about to run, asks for them (a switch runs the branch it picks).

A job stops at its first failing node, unless it keeps going (``keep_going``, make's
-k): then only the nodes that need a failed node's result are skipped, every
independent branch runs to the end and keeps its outputs, and the job still ends
failed, naming every failure.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import traceback as tb
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from engine.cache import OutputCache
from engine.context import Environment, Interrupted, JobInfo, NodeContext, NodeError
from engine.events import (Event, JobFailed, JobFinished, JobInterrupted, JobStarted, NodeFailed, NodeFinished,
                           NodeMessage, NodesCached, NodeStarted, Preview, Progress)
from engine.guard import unchecked_images
from engine.helper_threads import start_helper
from engine.node import ALWAYS, Result
from engine.paths import PathRefused
from engine.registry import Registry
from engine.validate import Plan, PlannedNode, still_valid, validate
from engine.workflow import Workflow

EventSink = Callable[[Event], None]


class BranchFailed(Exception):
    """A node that ran because a lazy input asked for it failed: the job fails naming *that*
    node, not the one whose input asked."""

    def __init__(self, node: PlannedNode, error: Exception) -> None:
        super().__init__(str(error))
        self.node, self.error = node, error


class BelowFailure(Exception):
    """A lazy input asked for a node that failed earlier in this job, or that a failure keeps from
    running: the asking node is skipped with it, not failed a second time."""


def is_lazy(node: PlannedNode, input_name: str) -> bool:
    inp = node.spec.input(input_name)
    return inp is not None and inp.lazy


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def node_signature(node: PlannedNode, input_signatures: dict[str, tuple[str, int]], fingerprint: Any) -> str:
    """Hash of everything that determines the node's result; its id is not part of it."""
    payload = {
        "type": node.spec.type,
        "version": node.spec.version,
        "literals": node.literals,
        "links": sorted((name, sig, idx) for name, (sig, idx) in input_signatures.items()),
        "fingerprint": fingerprint,
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def structural_signatures(plan: Plan) -> dict[str, str]:
    """Node signatures without the external fingerprints (file identities).

    Two machines compute the same ones for the same graph, whatever their paths
    and file times, so a cluster server can tell which worker already holds a
    job's upstream results (it routes by warmth) without asking the workers.
    """
    sigs: dict[str, str] = {}
    for node_id in plan.order:
        node = plan.nodes[node_id]
        inputs = {name: (sigs[link.node_id], link.output) for name, link in node.links.items()}
        sigs[node_id] = node_signature(node, inputs, None)
    return sigs


@dataclass
class JobOutcome:
    job_id: str
    status: str  # "succeeded" | "failed" | "interrupted"
    #: UI outputs (saved file names, text) of every node that produced some.
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Output values of every node that was computed or fetched, by node id.
    results: dict[str, tuple] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: JobFailed | None = None


class Executor:
    def __init__(self, registry: Registry, env: Environment, cache: OutputCache | None = None) -> None:
        self.registry = registry
        self.env = env
        self.cache = cache if cache is not None else OutputCache()
        self._lock = threading.Lock()
        #: Whole validations this executor made (:meth:`plan`); a plan reused by :meth:`replan` adds none.
        self.validations = 0

    def plan(self, workflow: Workflow, outputs: Iterable[str] | None = None) -> Plan:
        self.validations += 1
        return validate(workflow, self.registry, self.env, outputs)

    def replan(self, plan: Plan) -> Plan:
        """``plan`` (validated earlier, e.g. when its job was submitted) if it may still run here, else
        a fresh validation of its workflow, which raises what has become invalid
        (:func:`engine.validate.still_valid` decides)."""
        if still_valid(plan, self.registry, self.env):
            return plan
        return self.plan(plan.workflow, plan.outputs)

    def signatures(self, plan: Plan) -> dict[str, str]:
        sigs: dict[str, str] = {}
        for node_id in plan.order:
            node = plan.nodes[node_id]
            inputs = {name: (sigs[link.node_id], link.output) for name, link in node.links.items()}
            sigs[node_id] = node_signature(node, inputs, self._fingerprint(node))
        return sigs

    def _fingerprint(self, node: PlannedNode) -> Any:
        hook = node.spec.fingerprint
        if hook is None:
            return None
        try:
            value = hook(self.env, node.literals)
        except Exception:
            value = ALWAYS  # the node will run and report the problem itself
        return uuid.uuid4().hex if value is ALWAYS else value

    def run(
        self,
        workflow: Workflow | Plan,
        *,
        job_id: str | None = None,
        force: bool = False,
        on_event: EventSink | None = None,
        interrupt: threading.Event | None = None,
        outputs: Iterable[str] | None = None,
        job: JobInfo | None = None,
        keep_going: bool = False,
    ) -> JobOutcome:
        """Run a workflow to the end; validation errors raise before any event is sent.
        ``keep_going``: a failing node skips only what needs its result (see the module docstring)."""
        plan = workflow if isinstance(workflow, Plan) else self.plan(workflow, outputs)
        job_id = job_id or (job.id if job else uuid.uuid4().hex)
        if job is None:
            job = JobInfo(id=job_id, workflow=plan.api_prompt(), kiln_workflow=plan.workflow.to_kiln())
        with self._lock:
            return _Run(self, plan, job_id, job, force, on_event or (lambda e: None),
                        interrupt or threading.Event(), keep_going).execute()


class _Run:
    """One job's state: kept off the Executor so nothing leaks between jobs."""

    def __init__(self, executor: Executor, plan: Plan, job_id: str, job: JobInfo, force: bool,
                 emit: EventSink, interrupt: threading.Event, keep_going: bool = False) -> None:
        self.ex, self.plan, self.job_id, self.job = executor, plan, job_id, job
        self.force, self.emit, self.interrupt, self.keep_going = force, emit, interrupt, keep_going
        self.outcome = JobOutcome(job_id, "running")
        self.sigs: dict[str, str] = {}
        #: Who reads each node's outputs through a link the schedule follows (not a lazy one).
        self.consumers: dict[str, list[str]] = {}
        #: Keeping going: the failures so far, the nodes that failed, the nodes they keep from running.
        self.failures: list[NodeFailed] = []
        self.failed: set[str] = set()
        self.blocked: set[str] = set()

    def _schedule(self, sigs: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
        """Which nodes must run, and the cache entries of those served from it (lazy inputs aside)."""
        consumers: dict[str, list[str]] = {n: [] for n in self.plan.order}
        for node_id in self.plan.order:
            node = self.plan.nodes[node_id]
            for name, link in node.links.items():
                if not is_lazy(node, name):
                    consumers[link.node_id].append(node_id)
        self.consumers = consumers
        to_run: set[str] = set()
        from_cache: dict[str, Any] = {}
        targets = set(self.plan.outputs)
        for node_id in reversed(self.plan.order):
            if node_id not in targets and not any(c in to_run for c in consumers[node_id]):
                continue
            entry = None if self.force else self.ex.cache.get(sigs[node_id])
            if entry is None:
                to_run.add(node_id)
            else:
                from_cache[node_id] = entry  # pinned for this job even if later evicted
        return [n for n in self.plan.order if n in to_run], from_cache

    def execute(self) -> JobOutcome:
        started = time.perf_counter()
        sigs = self.ex.signatures(self.plan)
        run_order = self.begin(sigs)
        for node_id in run_order:
            if self.skips(node_id):
                continue
            node = self.plan.nodes[node_id]
            if self.interrupt.is_set():
                return self._interrupted(node)
            try:
                self._run_node(node, sigs[node_id])
            except Interrupted:
                return self._interrupted(node)
            except Exception as exc:  # a node failure ends the job (or its branch), never the process
                stopped = self.on_failure(node, exc)
                if stopped is not None:
                    return stopped
        return self.finish(started)

    def _produce(self, node_id: str) -> None:
        """Make node ``node_id``'s outputs available for a lazy input that asked for them: from
        the cache, or by running it after what its own (non-lazy) inputs need."""
        if node_id in self.outcome.results:
            return
        if self.skips(node_id):
            raise BelowFailure(node_id)
        node = self.plan.nodes[node_id]
        entry = None if self.force else self.ex.cache.get(self.sigs[node_id])
        if entry is not None:
            self.outcome.results[node_id] = entry.outputs
            self.outcome.cached.append(node_id)
            self.emit(NodesCached(self.job_id, node_ids=[node_id]))
            if entry.ui:
                self.outcome.outputs[node_id] = entry.ui
                self.emit(NodeFinished(self.job_id, node_id=node_id, node_type=node.spec.type, ui=entry.ui,
                                       cached=True))
            return
        for name, link in node.links.items():
            if not is_lazy(node, name):
                self._produce(link.node_id)
        if self.interrupt.is_set():
            raise Interrupted()
        try:
            self._run_node(node, self.sigs[node_id])
        except (Interrupted, BranchFailed, BelowFailure):
            raise
        except Exception as exc:
            raise BranchFailed(node, exc) from exc

    def _inputs(self, node: PlannedNode) -> dict[str, Any]:
        """The node's input values; lazy ones it asks for are produced first, the rest are None."""
        kwargs = dict(node.literals)
        pending = set()
        for name, link in node.links.items():
            if link.node_id in self.outcome.results:
                kwargs[name] = self.outcome.results[link.node_id][link.output]
            else:
                pending.add(name)  # only lazy inputs can be: the schedule made the others
        while pending and node.spec.lazy is not None:
            wanted = set(node.spec.lazy(dict(kwargs), frozenset(pending))) & pending
            if not wanted:
                break
            for name in sorted(wanted):
                link = node.links[name]
                self._produce(link.node_id)
                kwargs[name] = self.outcome.results[link.node_id][link.output]
            pending -= wanted
        kwargs.update(dict.fromkeys(pending))
        return kwargs

    def begin(self, sigs: dict[str, str], prefetch: bool = True) -> list[str]:
        """Start the job: schedule it, report what the cache serves; returns the nodes to run, in order.

        Shared with :mod:`engine.batching`, which runs several jobs' nodes in step.
        """
        self.sigs = sigs
        run_order, from_cache = self._schedule(sigs)
        if prefetch:
            self._start_prefetch(run_order)
        cached = [n for n in self.plan.order if n in from_cache]
        self.outcome.cached = cached
        self.emit(JobStarted(self.job_id, node_ids=list(self.plan.order)))
        self.emit(NodesCached(self.job_id, node_ids=cached))
        for node_id in cached:
            entry = from_cache[node_id]
            self.outcome.results[node_id] = entry.outputs
            if entry.ui:
                self.outcome.outputs[node_id] = entry.ui
                node = self.plan.nodes[node_id]
                self.emit(NodeFinished(self.job_id, node_id=node_id, node_type=node.spec.type, ui=entry.ui, cached=True))
        return run_order

    def finish(self, started: float) -> JobOutcome:
        """The end of a job that ran through its schedule: succeeded, or failed after keeping going."""
        if not self.failures:
            return self.succeed(started)
        return self._end_failed(self.failures)

    def on_failure(self, node: PlannedNode, exc: Exception) -> JobOutcome | None:
        """A node raised: end the job (its outcome), or, keeping going, skip what needs the failed
        node and go on (None)."""
        if isinstance(exc, BelowFailure):  # only reachable keeping going
            self._block(node.id)
            return None
        if not self.keep_going:
            return self._failed(node, exc)
        failure = self._failure(node, exc)
        before = set(self.blocked)
        self.failed.add(failure.node_id)
        for consumer in self.consumers.get(failure.node_id, ()):
            self._block(consumer)
        if failure.node_id != node.id:  # the node whose lazy input ran the failing branch
            self._block(node.id)
        failure.blocked = [n for n in self.plan.order if n in self.blocked - before]
        self.failures.append(failure)
        self.emit(failure)
        return None

    def _failure(self, node: PlannedNode, exc: Exception) -> NodeFailed:
        """What failed and why; a lazily produced branch's failure is that branch node's."""
        if isinstance(exc, BranchFailed):
            node, exc = exc.node, exc.error
        return NodeFailed(self.job_id, node_id=node.id, node_type=node.spec.type,
                          input_name=getattr(exc, "input_name", None), message=str(exc) or type(exc).__name__,
                          exception_type=type(exc).__name__,
                          traceback=tb.format_exception(type(exc), exc, exc.__traceback__))

    def skips(self, node_id: str) -> bool:
        """Whether the node failed, or needs what failed, earlier in this job (keeping going): it is
        not run (again)."""
        return node_id in self.failed or node_id in self.blocked

    def _block(self, node_id: str) -> None:
        """Skip ``node_id`` and everything downstream that has no result yet (a result served from
        the cache stays usable: what reads it need not wait for what failed)."""
        todo = [node_id]
        while todo:
            current = todo.pop()
            if current in self.blocked or current in self.failed or current in self.outcome.results:
                continue
            self.blocked.add(current)
            todo.extend(self.consumers.get(current, ()))

    def succeed(self, started: float) -> JobOutcome:
        self.outcome.status = "succeeded"
        self.emit(JobFinished(self.job_id, outputs=self.outcome.outputs, executed=self.outcome.executed,
                              cached=self.outcome.cached, seconds=round(time.perf_counter() - started, 4)))
        return self.outcome

    def _start_prefetch(self, run_order: list[str]) -> None:
        """Start the prefetch hooks of the nodes that will run, in one background thread, in plan order
        (a helper of the job's thread: what a loader keeps per thread is kept for that one).

        A model loader's hook puts the model into the manager, whose lock makes the
        node's own load wait for it and then find it: the load overlaps whatever runs
        first (loading an image, importing torch) instead of following it. Nothing
        starts when no node to run has a hook, so an image-only job imports no torch.
        """
        hooks = [(self.plan.nodes[n].spec.prefetch, dict(self.plan.nodes[n].literals)) for n in run_order
                 if self.plan.nodes[n].spec.prefetch is not None]
        if not hooks:
            return
        env = self.ex.env

        def work() -> None:
            for hook, literals in hooks:
                if self.interrupt.is_set():
                    return
                try:
                    hook(env, literals)
                except Exception:  # the node reports it when it runs
                    pass

        start_helper(work, name=f"kiln-prefetch-{self.job_id[:8]}")

    def _run_node(self, node: PlannedNode, signature: str) -> None:
        kwargs = self._inputs(node)  # a lazy input's branch runs first, before this node starts
        self.emit(NodeStarted(self.job_id, node_id=node.id, node_type=node.spec.type))
        t0 = time.perf_counter()
        ctx = NodeContext(
            env=self.ex.env, job=self.job, node_id=node.id, node_type=node.spec.type,
            _progress=lambda v, m, p, nid=node.id: self._progress(nid, v, m, p),
            _is_interrupted=self.interrupt.is_set,
            _message=lambda text, n=node: self.emit(
                NodeMessage(self.job_id, node_id=n.id, node_type=n.spec.type, message=text)),
        )
        raw = node.spec.fn(ctx, **kwargs)
        outputs, ui = _normalise(raw, node)
        if self.ex.env.output_guard is not None:
            self._withhold_unchecked(ui)
        self.outcome.results[node.id] = outputs
        self.outcome.executed.append(node.id)
        if ui:
            self.outcome.outputs[node.id] = ui
        self.ex.cache.put(signature, outputs, ui)
        self.emit(NodeFinished(self.job_id, node_id=node.id, node_type=node.spec.type, ui=ui,
                               seconds=round(time.perf_counter() - t0, 4)))

    def _withhold_unchecked(self, ui: dict[str, Any]) -> None:
        """Fail closed: images saved around the guard are deleted and the node fails."""
        stray = unchecked_images(ui)
        if not stray:
            return
        roots = {"output": self.ex.env.paths.output, "temp": self.ex.env.paths.temp}
        for entry in stray:
            root = roots.get(str(entry.get("type")))
            try:
                if root is not None:
                    root.resolve(str(entry.get("filename")), str(entry.get("subfolder") or "")).unlink(missing_ok=True)
            except (PathRefused, OSError, ValueError):
                pass
        raise NodeError(f"the server's safety filter is on and this node saved {len(stray)} image(s) without "
                        "passing them through it; they were removed (save images with Kiln's image writer)")

    def _progress(self, node_id: str, value: int, maximum: int, preview: Any) -> None:
        preview = preview if isinstance(preview, Preview) else None
        guard = self.ex.env.output_guard
        if preview is not None and guard is not None:
            try:  # every preview any node makes passes here: none leaves unchecked
                preview = guard.check_preview(preview)
            except Exception:  # fail closed, and a preview must never fail a job
                preview = None
        self.emit(Progress(self.job_id, node_id=node_id, value=int(value), max=int(maximum), preview=preview))

    def _interrupted(self, node: PlannedNode) -> JobOutcome:
        self.outcome.status = "interrupted"
        self.emit(JobInterrupted(self.job_id, node_id=node.id, node_type=node.spec.type,
                                 executed=list(self.outcome.executed)))
        return self.outcome

    def _failed(self, node: PlannedNode, exc: Exception) -> JobOutcome:
        return self._end_failed([self._failure(node, exc)])

    def _end_failed(self, failures: list[NodeFailed]) -> JobOutcome:
        first = failures[0]
        self.outcome.status = "failed"
        event = JobFailed(
            self.job_id, node_id=first.node_id, node_type=first.node_type, input_name=first.input_name,
            message=first.message, exception_type=first.exception_type, traceback=first.traceback,
            executed=list(self.outcome.executed), failures=[f.summary() for f in failures],
            blocked=[n for n in self.plan.order if n in self.blocked])
        self.outcome.error = event
        self.emit(event)
        return self.outcome


def _normalise(raw: Any, node: PlannedNode) -> tuple[tuple, dict[str, Any]]:
    ui: dict[str, Any] = {}
    if isinstance(raw, Result):
        raw, ui = raw.outputs, raw.ui
    if raw is None:
        raw = ()
    if not isinstance(raw, tuple):
        raw = (raw,) if len(node.spec.outputs) == 1 else tuple(raw)
    if len(raw) != len(node.spec.outputs):
        raise NodeError(f"returned {len(raw)} value(s) for {len(node.spec.outputs)} declared output(s)")
    return raw, ui

