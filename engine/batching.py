"""Running several queued jobs together: shared nodes once, batchable nodes as one call.

Jobs whose graphs are the same except for literal inputs that a node declares it
can batch (:class:`engine.node.Batch`, e.g. a sampler's seed) have the same
:func:`batch_key`. :func:`run_together` then walks their plans in step, node by
node, and decides from the real signatures (never from the key), so a wrong
grouping can only cost speed, not change a result:

* a node whose signature is the same in every job runs once and every job gets
  its result (the text encoder, the model loader, the empty latent);
* a node whose inputs are the same and whose literals differ only in its
  declared ``vary`` inputs runs once through its ``Batch.run`` (one sampler
  batch); each job gets its own outputs, and a node message saying so;
* everything else (what follows the batched node, and every output node, which
  writes the job's own files) runs per job.

Each job keeps its own events (started, progress, executed, finished), its own
outcome and its own interrupt. A failing batched call, or one stopped because
one of its jobs was interrupted, is not final for the others: they run that node
again alone, so one bad job never takes the rest down. The engine knows no
torch: what batching means for a node is the node's declaration.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine.context import Interrupted, JobInfo, NodeContext
from engine.events import Event, NodeFinished, NodeMessage, NodeStarted
from engine.executor import Executor, JobOutcome, _canonical, _normalise, _Run
from engine.validate import Plan

log = logging.getLogger(__name__)

#: How many queued jobs a server runs as one batch unless told (``kiln serve --batch-jobs``).
BATCH_JOBS_DEFAULT = 4


def batch_key(plan: Plan, env: Any = None) -> str | None:
    """What must be equal for jobs to run together; None when the plan has no batchable node.

    The structural signatures of every node with each batchable node's ``vary``
    literals left out, plus the node ids, the order and the outputs asked for.
    The literals of :func:`per_job_nodes` (the prompts, the input image) are left
    out too: they only feed inputs a batchable node takes per job. Those that set
    an image size (a node's ``Size`` declaration: width, height, batch, scale...)
    stay in: jobs of other sizes cannot share a sampler batch, and grouping them
    would only hold the first job back until the last one is done. For the same
    reason a per-job node whose size comes from its file (LoadImage's ``probe``)
    keys on the size the probe reads with ``env`` (the header only, cached), so
    images of other sizes that are not resized to one size do not group.
    """
    masked: dict[str, str] = {}
    batchable = False
    free = per_job_nodes(plan)
    for node_id in plan.order:
        node = plan.nodes[node_id]
        vary = node.spec.batch.vary if node.spec.batch is not None else ()
        batchable = batchable or bool(vary)
        if node_id in free:  # its literals may differ, except those that set an image size
            shape = _size_inputs(node.spec)
            literals = {k: (v if k in shape else None) for k, v in node.literals.items()}
            probe = getattr(node.spec.size, "probe", None)
            if probe is not None and env is not None:
                literals[" probed size"] = probe(env, node.literals)
        else:
            literals = {k: v for k, v in node.literals.items() if k not in vary}
        payload = {"type": node.spec.type, "version": node.spec.version, "literals": literals,
                   "links": sorted((name, masked[link.node_id], link.output) for name, link in node.links.items())}
        masked[node_id] = hashlib.sha256(_canonical(payload).encode()).hexdigest()
    if not batchable:
        return None
    whole = {"order": list(plan.order), "nodes": masked, "outputs": sorted(plan.outputs)}
    return hashlib.sha256(_canonical(whole).encode()).hexdigest()


def _size_inputs(spec: Any) -> set[str]:
    """The inputs with which a node sets the size of what it makes (not the file it reads, nor the
    input it takes its size from)."""
    size = spec.size
    if size is None:
        return set()
    return set(size.input_names()) - {size.reads, size.like}


def per_job_nodes(plan: Plan) -> set[str]:
    """Nodes whose literals may differ between jobs of one batch (each job runs them itself).

    A node qualifies when its results reach the rest of the graph only through
    inputs that a batchable node declares it takes per job (``vary``), directly
    or through other such nodes, and it is upstream of every batchable node: the
    prompt encoders feeding a sampler's ``positive``, the image loading and
    encoding feeding AddNoise's ``latent``. Batchable nodes themselves and what
    follows them do not: there the jobs meet, and their settings (steps, sampler)
    must match, or jobs that cannot share a call would be held in step for nothing.
    """
    consumers: dict[str, list[tuple[str, str]]] = {}
    after: set[str] = set()  # batchable nodes and what depends on them
    for node_id in plan.order:
        node = plan.nodes[node_id]
        for name, link in node.links.items():
            consumers.setdefault(link.node_id, []).append((node_id, name))
        if node.spec.batch is not None or any(link.node_id in after for link in node.links.values()):
            after.add(node_id)
    free: set[str] = set()
    for node_id in reversed(plan.order):
        uses = consumers.get(node_id)
        if node_id in after or plan.nodes[node_id].spec.output_node or not uses:
            continue
        if all(user in free or (plan.nodes[user].spec.batch is not None and name in plan.nodes[user].spec.batch.vary)
               for user, name in uses):
            free.add(node_id)
    return free


def _share_progress(runs: list[_Run], node_id: str, value: int, maximum: int, preview: Any) -> None:
    """One progress report of a call made for several jobs, to each of them.

    A batched call may pass one preview per job (a list in the order of its items:
    each job's own image); a single preview is the first job's image, so the others
    get progress without one. A job nobody watches gets none.
    """
    if isinstance(preview, (list, tuple)) and len(preview) == len(runs):
        previews = list(preview)
    else:
        previews = [preview] + [None] * (len(runs) - 1)
    for run, own in zip(runs, previews):
        run._progress(node_id, value, maximum, own if run.job.previews else None)


@dataclass
class BatchItem:
    """One job of a group: its plan, what it carries, where its events go, its interrupt."""

    plan: Plan
    job: JobInfo
    emit: Callable[[Event], None]
    interrupt: threading.Event
    force: bool = False
    keep_going: bool = False


def run_together(executor: Executor, items: list[BatchItem]) -> list[JobOutcome]:
    """Run the jobs (same :func:`batch_key`) in step; one outcome per item, in order."""
    if any(item.plan.order != items[0].plan.order for item in items):
        raise ValueError("jobs run together must have the same nodes in the same order (the same batch_key)")
    with executor._lock:
        return _Together(executor, items).execute()


class _Together:
    def __init__(self, ex: Executor, items: list[BatchItem]) -> None:
        self.ex = ex
        self.runs = [_Run(ex, it.plan, it.job.id, it.job, it.force, it.emit, it.interrupt, it.keep_going)
                     for it in items]
        self.sigs: list[dict[str, str]] = []
        self.stopped: set[int] = set()

    def execute(self) -> list[JobOutcome]:
        started = time.perf_counter()
        self.sigs = [self.ex.signatures(r.plan) for r in self.runs]
        todo = [set(r.begin(s, prefetch=i == 0)) for i, (r, s) in enumerate(zip(self.runs, self.sigs))]
        for node_id in self.runs[0].plan.order:
            group = [i for i, run in enumerate(self.runs)
                     if i not in self.stopped and node_id in todo[i] and not run.skips(node_id)]
            group = [i for i in group if not self._stop_if_interrupted(i, node_id)]
            if group:
                self._step(node_id, group)
        for i, run in enumerate(self.runs):
            if i not in self.stopped:
                run.finish(started)
        return [run.outcome for run in self.runs]

    # -- one node, for the jobs that need it ---------------------------------------------

    def _step(self, node_id: str, group: list[int]) -> None:
        spec = self.runs[group[0]].plan.nodes[node_id].spec
        # output nodes write each job's own files; a node with lazy inputs produces them per job
        if len(group) > 1 and not spec.output_node and spec.lazy is None:
            if len({self.sigs[i][node_id] for i in group}) == 1:
                group = self._shared(node_id, group)
            else:
                items = self._batch_items(node_id, group)
                if items is not None:
                    group = self._batched(node_id, group, items)
        for i in group:
            self._alone(i, node_id)

    def _alone(self, i: int, node_id: str) -> None:
        run = self.runs[i]
        node = run.plan.nodes[node_id]
        try:
            run._run_node(node, self.sigs[i][node_id])
        except Interrupted:
            self._stop(i, run._interrupted(node))
        except Exception as exc:  # this job fails (or, keeping going, this branch); the others go on
            self._failed(i, node, exc)

    def _shared(self, node_id: str, group: list[int]) -> list[int]:
        """Run a node that is the same in every job once; returns the jobs still to run it alone."""
        node = self.runs[group[0]].plan.nodes[node_id]
        try:
            raw, seconds = self._call(node_id, group, lambda ctx, kwargs: node.spec.fn(ctx, **kwargs), None)
            outputs, ui = _normalise(raw, node)
            self._guard(group[0], ui)
        except Interrupted:
            return self._after_interrupt(node_id, group)
        except Exception as exc:  # the same inputs fail the same way alone: each job fails with it
            for i in group:
                self._failed(i, node, exc)
            return []
        self.ex.cache.put(self.sigs[group[0]][node_id], outputs, ui)
        for i in group:
            self._record(i, node_id, outputs, ui, seconds)
        return []

    def _batch_items(self, node_id: str, group: list[int]) -> list[dict[str, Any]] | None:
        """Each job's values of the node's ``vary`` inputs, when only those differ; else None."""
        nodes = [self.runs[i].plan.nodes[node_id] for i in group]
        batch = nodes[0].spec.batch
        if batch is None:
            return None
        first = nodes[0]
        for i, node in zip(group, nodes):
            if node.spec is not first.spec or set(node.links) != set(first.links):
                return None
            if any(self.sigs[i][link.node_id] != self.sigs[group[0]][first.links[name].node_id]
                   or link.output != first.links[name].output
                   for name, link in node.links.items() if name not in batch.vary):
                return None
            fixed = {k: v for k, v in node.literals.items() if k not in batch.vary}
            if fixed != {k: v for k, v in first.literals.items() if k not in batch.vary}:
                return None
        items = []
        for i, node in zip(group, nodes):
            item = {name: node.literals[name] for name in batch.vary if name in node.literals}
            for name in batch.vary:
                link = node.links.get(name)
                if link is not None:  # a linked input the node batches (KSampler's latents): this job's value
                    item[name] = self.runs[i].outcome.results[link.node_id][link.output]
            items.append(item)
        return items

    def _batched(self, node_id: str, group: list[int], items: list[dict[str, Any]]) -> list[int]:
        """Run the node once for the group through its Batch.run; returns the jobs still to run it alone."""
        node = self.runs[group[0]].plan.nodes[node_id]
        batch = node.spec.batch
        assert batch is not None
        fixed = {k: v for k, v in node.literals.items() if k not in batch.vary}
        try:
            raws, seconds = self._call(node_id, group, lambda ctx, kwargs: batch.run(ctx, items, **kwargs), fixed)
            if raws is None:  # the node declined: not a case it batches exactly
                return group
            if len(raws) != len(group):
                raise RuntimeError(f"returned {len(raws)} results for {len(group)} jobs")
            results = [_normalise(raw, node) for raw in raws]
            for i, (_, ui) in zip(group, results):
                self._guard(i, ui)
        except Interrupted:
            return self._after_interrupt(node_id, group)
        except Exception as exc:
            log.warning("%s ran as one batch for %d jobs and failed (%s); each job runs it alone",
                        node.spec.type, len(group), exc, exc_info=True)
            for i in group:
                self._message(i, node_id, f"running this node as one batch with {len(group) - 1} other job(s) "
                                          f"failed ({exc}); it runs for this job alone")
            return group
        ids = [self.runs[i].job_id for i in group]
        for i, (outputs, ui) in zip(group, results):
            self.ex.cache.put(self.sigs[i][node_id], outputs, ui)
            others = ", ".join(j for j in ids if j != self.runs[i].job_id)
            self._message(i, node_id, f"ran as one batch of {len(group)} jobs (with {others})")
            self._record(i, node_id, outputs, ui, seconds)
        return []

    # -- helpers -------------------------------------------------------------------------

    def _call(self, node_id: str, group: list[int], call: Callable[[NodeContext, dict], Any],
              literals: dict[str, Any] | None) -> tuple[Any, float]:
        """Call a node once on behalf of ``group``: every job sees it start, its progress and messages.

        Inputs are read from the first job (the callers made sure they are the same
        in all); ``literals`` replaces the node's literals when given: the batched call,
        which leaves out the varying literals and links (its items carry them). Any
        job's interrupt stops the call.
        """
        lead = self.runs[group[0]]
        node = lead.plan.nodes[node_id]
        runs = [self.runs[i] for i in group]
        for run in runs:
            run.emit(NodeStarted(run.job_id, node_id=node_id, node_type=node.spec.type))
        t0 = time.perf_counter()
        kwargs = dict(node.literals if literals is None else literals)
        vary = node.spec.batch.vary if literals is not None and node.spec.batch is not None else ()
        for name, link in node.links.items():
            if name not in vary:  # a batched call gets those per job, in its items
                kwargs[name] = lead.outcome.results[link.node_id][link.output]
        ctx = NodeContext(
            env=self.ex.env, job=dataclasses.replace(lead.job, previews=any(r.job.previews for r in runs)),
            node_id=node_id, node_type=node.spec.type,
            _progress=lambda v, m, p: _share_progress(runs, node_id, v, m, p),
            _is_interrupted=lambda: any(r.interrupt.is_set() for r in runs),
            _message=lambda text: [self._message(i, node_id, text) for i in group] and None,
        )
        raw = call(ctx, kwargs)
        return raw, round(time.perf_counter() - t0, 4)

    def _guard(self, i: int, ui: dict[str, Any]) -> None:
        """The executor's fail-closed check of saved images, as for a node run alone."""
        if ui and self.ex.env.output_guard is not None:
            self.runs[i]._withhold_unchecked(ui)

    def _record(self, i: int, node_id: str, outputs: tuple, ui: dict[str, Any], seconds: float) -> None:
        run = self.runs[i]
        run.outcome.results[node_id] = outputs
        run.outcome.executed.append(node_id)
        if ui:
            run.outcome.outputs[node_id] = ui
        run.emit(NodeFinished(run.job_id, node_id=node_id, node_type=run.plan.nodes[node_id].spec.type, ui=ui,
                              seconds=seconds))

    def _message(self, i: int, node_id: str, text: str) -> None:
        run = self.runs[i]
        run.emit(NodeMessage(run.job_id, node_id=node_id, node_type=run.plan.nodes[node_id].spec.type, message=text))

    def _after_interrupt(self, node_id: str, group: list[int]) -> list[int]:
        """A shared call was stopped: the interrupted jobs end, the others run the node alone."""
        return [i for i in group if not self._stop_if_interrupted(i, node_id)]

    def _stop_if_interrupted(self, i: int, node_id: str) -> bool:
        run = self.runs[i]
        if not run.interrupt.is_set():
            return False
        self._stop(i, run._interrupted(run.plan.nodes[node_id]))
        return True

    def _failed(self, i: int, node: Any, exc: Exception) -> None:
        outcome = self.runs[i].on_failure(node, exc)
        if outcome is not None:
            self._stop(i, outcome)

    def _stop(self, i: int, outcome: JobOutcome) -> None:
        self.stopped.add(i)
