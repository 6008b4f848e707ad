"""Cross-job batching in the in-process worker: queued jobs that differ only in seeds run as one batch.

When a lane takes a job it looks at the jobs queued right behind it. Those with
the same :func:`engine.batching.batch_key` (the same graph apart from literals
that a node declares it batches, such as KSampler's seed), the same force flag
and the same outputs to execute are claimed too, up to ``Worker.batch_jobs``, and
:func:`engine.batching.run_together` runs the group: shared nodes once, the
sampler as one batch, the rest per job. The scan stops at the first job that
does not fit, so no job overtakes one queued before it that is not in the batch.

Each job keeps what it has alone: its own :class:`~engine.server.worker.JobReport`
(events, progress, history messages), its own interrupt (cancelling one job of a
batch stops it; the others run the sampler again alone), and its own outcome,
committed to the store before its terminal event is published. Off unless the
server is started with ``batch_jobs`` > 1 (``kiln serve --batch-jobs``).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from engine.batching import BatchItem, batch_key, run_together
from engine.server.store import FAILED, JobRecord
from engine.validate import Plan

if TYPE_CHECKING:
    from engine.server.worker import Worker, _Lane

log = logging.getLogger(__name__)

#: At most this many queued jobs behind the first one are looked at (each is planned: see worker.job_plan).
LOOK_AHEAD = 16


def run_group(worker: "Worker", lane: "_Lane", job: JobRecord) -> bool:
    """Run ``job`` with the queued jobs that can share its batch; False (nothing done) when none can."""
    try:
        group = _gather(worker, lane, job)
    except Exception:  # the database is busy or broken: the job runs alone, as it would without batching
        log.exception("looking for jobs to batch with %s failed; it runs alone", job.id)
        _give_back(worker, lane)
        return False
    if len(group) == 1:
        return False
    worker.on_queue_change()
    try:
        _run(worker, lane, group)
    finally:
        with worker._lock:
            lane.followers.clear()
        for member, _ in group[1:]:
            worker._progress.pop(member.id, None)
    return True


def _gather(worker: "Worker", lane: "_Lane", job: JobRecord) -> list[tuple[JobRecord, Plan | None]]:
    """``job`` and the jobs queued right behind it that fit its batch, claimed."""
    queued = worker.store.queued(min(LOOK_AHEAD, worker.batch_jobs - 1))
    if not queued:  # the usual case on a quiet server: one query, nothing planned twice
        return [(job, None)]
    worker._resolve_device(lane)
    first = _plan(worker, lane, job)
    key = batch_key(first, lane.env) if first is not None else None
    if first is None or key is None:
        return [(job, first)]
    group: list[tuple[JobRecord, Plan | None]] = [(job, first)]
    for candidate in queued:
        if len(group) >= worker.batch_jobs or not _fits(job, candidate):
            break
        plan = _plan(worker, lane, candidate)
        if plan is None or batch_key(plan, lane.env) != key:
            break
        with worker._lock:  # the same lock as cancelling: a job is never lost between queued and running
            claimed = worker.store.claim(candidate.id)
            if claimed is None:  # cancelled meanwhile: the next one may still fit
                continue
            lane.followers[claimed.id] = threading.Event()
        group.append((claimed, plan))
    return group


def _give_back(worker: "Worker", lane: "_Lane") -> None:
    """Put the jobs claimed for a batch that will not run back in the queue, in their places."""
    with worker._lock:
        for job_id in list(lane.followers):
            try:
                worker.store.requeue(job_id)
            except Exception:
                log.exception("job %s could not be put back in the queue", job_id)
        lane.followers.clear()


def _fits(job: JobRecord, candidate: JobRecord) -> bool:
    """The job-level settings a batch shares (the graph is compared by batch_key)."""
    return (candidate.force == job.force and candidate.keep_going == job.keep_going
            and sorted(candidate.outputs_to_execute) == sorted(job.outputs_to_execute))


def _plan(worker: "Worker", lane: "_Lane", job: JobRecord) -> Plan | None:
    """The job's plan, or None when it does not plan (it then runs alone and reports why)."""
    from engine.server.worker import job_plan

    try:
        return job_plan(worker.store, worker.registry, lane.executor, job)
    except Exception:
        return None


def _run(worker: "Worker", lane: "_Lane", group: list[tuple[JobRecord, Plan]]) -> None:
    from engine.server.worker import _STATUS, JobReport, error_dict, internal_error

    reports = [JobReport(job, worker._publish, worker._progress, worker._redact) for job, _ in group]
    interrupts = [lane.interrupt] + [lane.followers[job.id] for job, _ in group[1:]]
    items = [BatchItem(plan, worker._job_info(job, plan), report.event, interrupt, job.force, job.keep_going)
             for (job, plan), report, interrupt in zip(group, reports, interrupts)]
    log.info("running %d jobs as one batch: %s", len(group), ", ".join(job.id for job, _ in group))
    try:
        outcomes = run_together(lane.executor, items)
    except Exception as exc:  # an engine bug: every job of the batch fails with it, the worker goes on
        for report, (job, _) in zip(reports, group):
            report.held.clear()
            event = internal_error(job.id, exc)
            report.event(event)
            report.finish(worker.store, FAILED, {}, error_dict(worker._redact(event)), [], [])
        return
    for report, outcome in zip(reports, outcomes):
        error: dict[str, Any] | None = None
        if outcome.error is not None:
            error = error_dict(worker._redact(outcome.error))
        report.finish(worker.store, _STATUS[outcome.status], outcome.outputs, error, outcome.executed,
                      outcome.cached)
