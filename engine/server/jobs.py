"""Submitting a job: the shared submission path (engine.submission), then a durable queue.

Shared by Kiln's ``POST /api/jobs`` and ComfyUI's ``POST /prompt`` so both refuse
the same workflows, ids and extra data for the same reasons. Validation happens before the job is
stored: a queued job was valid when it was accepted. The plan that validation made goes
to the worker with the job (``JobStore.add(plan=...)``), which re-checks only what can
have changed while it waited (files, the budget: engine.validate.still_valid)
instead of validating the whole workflow again.
"""
from __future__ import annotations

import asyncio
import functools
import sqlite3
from typing import Any, Iterable

from aiohttp import web

from engine import submission
from engine.guard import artifacts
from engine.paths import split_annotation
from engine.server.handoff import run_submission
from engine.server.state import AppState
from engine.server.store import JobRecord
from engine.submission import SubmissionInvalid, problem
from engine.validate import Plan, ValidationError
from engine.workflow import Workflow

#: extra_data keys never stored (ComfyUI's SENSITIVE_EXTRA_DATA_KEYS).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


#: Refusals are the shared submission path's (one problem shape for every door).
SubmitRefused = SubmissionInvalid

#: The longest job id or client id accepted: ``/api/jobs/{id}`` must be able to name
#: every job, so ``/prompt`` and ``/api/jobs`` share this one limit.
MAX_ID_LENGTH = 200
#: Longest error message a job list shows per job; the job's own route has it all.
LIST_MESSAGE_CHARS = 500


def prepare(state: AppState, doc: Any, params: Any = None, outputs: Any = None) -> tuple[Workflow, Plan, dict]:
    """Parse and validate a submission; raises :class:`SubmitRefused` with every problem.

    Messages name files by their folder (``models/checkpoints/x``), never by the
    server's absolute paths, whatever a node's validate hook wrote.
    """
    try:
        return submission.prepare(doc, state.registry, state.env, params, outputs)
    except SubmitRefused as exc:
        for error in exc.errors:
            error.message = state.env.paths.scrub(error.message)
        raise


def _id_problem(field: str, value: Any) -> ValidationError | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        return problem("invalid_request", f"'{field}' must be a non-empty string of at most {MAX_ID_LENGTH} "
                                          "characters")
    trouble = submission.json_problem(value)
    if trouble or any(ord(c) < 32 for c in value):
        return problem("invalid_request", f"'{field}' may contain only printable text")
    return None


def _extra_problem(extra: Any) -> ValidationError | None:
    if extra is None:
        return None
    if not isinstance(extra, dict):
        return problem("invalid_request", "'extra_data' must be an object")
    if not isinstance(extra.get("extra_pnginfo", {}), dict):
        return problem("invalid_request", "'extra_data.extra_pnginfo' must be an object of name -> value")
    trouble = submission.json_problem(extra)
    return problem("invalid_request", f"extra_data: {trouble}") if trouble else None


def submit(state: AppState, doc: Any, *, params: Any = None, outputs: Any = None, force: bool = False,
           client_id: str | None = None, job_id: str | None = None, number: float | None = None,
           front: bool = False, extra_data: dict[str, Any] | None = None, keep_going: bool = False) -> JobRecord:
    """Validate and durably queue a job; the row is committed when this returns."""
    trouble = [p for p in (_id_problem("job_id", job_id), _id_problem("client_id", client_id),
                           _extra_problem(extra_data)) if p is not None]
    if trouble:
        raise SubmitRefused(trouble)
    workflow, plan, applied = prepare(state, doc, params, outputs)
    extra = {k: v for k, v in (extra_data or {}).items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
    if client_id:
        extra["client_id"] = client_id
    add = functools.partial(state.store.add, workflow=workflow.to_kiln(), prompt=plan.api_prompt(), job_id=job_id,
                            number=number, front=front, client_id=client_id or None,
                            source_format=workflow.source_format, params=applied, outputs_to_execute=plan.outputs,
                            force=force, extra_data=extra, plan=plan, keep_going=keep_going)
    add_job = getattr(state.worker, "add_job", None)  # an idle lane storing it starts it too
    try:
        job = add_job(lambda start: add(start=start)) if add_job is not None else add()
    except sqlite3.IntegrityError:
        raise SubmitRefused([problem("duplicate_id", f"a job with id '{job_id}' already exists")]) from None
    job.ignored = plan.ignored
    state.worker.wake()
    return job


async def submit_held(state: AppState, doc: Any, job_id: Any, **options: Any) -> JobRecord:
    """:func:`submit` off the event loop (on an idle worker lane when there is one, which then runs
    the job without another hand-off: engine.server.handoff) with the job's events held until its
    reply is written.

    The caller answers through :func:`reply_then_release`; on any failure here the
    hold is dropped at once (nothing was queued under this id by this call).
    """
    held = job_id if isinstance(job_id, str) else None  # anything else is refused by submit
    if held:
        state.hub.hold(held)
    try:
        return await run_submission(getattr(state.worker, "offer", None),
                                    functools.partial(submit, state, doc, job_id=job_id, **options))
    except BaseException:
        if held:
            state.hub.release(held)
        raise


async def reply_then_release(request: web.Request, response: web.StreamResponse, state: AppState,
                             job_id: str, grace: float = 0.0) -> web.StreamResponse:
    """Write a submission's reply, then let the job's websocket events go.

    The route holds the job's id in the hub before submitting (``hub.hold``), so
    no message about the job reaches any socket before this reply, which names
    the job, has been written to the client's connection.

    ComfyUI's ``/prompt`` passes ``grace`` (``settings.event_grace_s``, 50 ms):
    the events then wait that much longer, because clients such as comfy-script
    read the reply on one thread and the socket on another, and a fully cached
    job's whole message sequence, sent the moment the reply is out, still
    overtook the thread that registers the prompt id (2 hangs in 4 runs of 20
    resubmissions with no margin, none in 6 runs with 10-50 ms). ComfyUI's own
    path from queue to first message (a thread hand-off, then execution) is of
    that order, so these clients never see the race there. Only a job that
    finishes within the margin waits at all.

    Kiln's ``/api/jobs`` passes none: its websocket tells a job finished as soon as
    it has (an identical resubmit in a few ms instead of 50). Its clients keep
    events of a job id they have not seen answered yet until the reply names it
    (the editor's runner does), which the reply-first order makes a short wait.
    """
    try:
        await response.prepare(request)
        await response.write_eof()
    finally:
        if grace > 0:
            asyncio.get_running_loop().call_later(grace, state.hub.release, job_id)
        else:
            state.hub.release(job_id)
    return response


# -- views --------------------------------------------------------------------------------

def job_view(state: AppState, job: JobRecord, *, full: bool = True) -> dict[str, Any]:
    """Kiln's job JSON (``GET /api/jobs/{id}``)."""
    error = None
    if job.error:
        error = {k: job.error.get(k) for k in ("node_id", "node_type", "input_name", "message", "exception_type")}
        if full:
            error["traceback"] = job.error.get("traceback") or []
            error["failures"] = job.error.get("failures") or []  # a job that kept going: each failure
            error["blocked"] = job.error.get("blocked") or []
        else:  # a list stays small whatever the jobs' errors were
            message = str(error.get("message") or "")
            error["message"] = message if len(message) <= LIST_MESSAGE_CHARS else \
                message[:LIST_MESSAGE_CHARS] + "... (GET /api/jobs/{id} has all of it)"
    view: dict[str, Any] = {
        "id": job.id, "status": job.status,
        "progress": state.worker.progress(job.id) if job.status == "running" else None,
        "outputs": job.outputs, "error": error,
        "created": job.created, "started": job.started, "finished": job.finished,
        "client_id": job.client_id, "number": job.comfy_number, "params": job.params,
        "executed": job.executed, "cached": job.cached, "worker": job.worker,
        "artifacts": artifacts(job.outputs or {}),
        "input_images": input_images(state, job.workflow),
    }
    if full:
        view["workflow"] = job.workflow
    return view


def input_images(state: AppState, workflow: Any) -> list[dict[str, str]]:
    """The pictures a job loaded (inputs declared ``image_upload``, as LoadImage's), as /view refs.

    The editor's result viewer compares a result with its input (A/B) from these.
    """
    found: list[dict[str, str]] = []
    nodes = workflow.get("nodes") if isinstance(workflow, dict) else None
    for node in (nodes.values() if isinstance(nodes, dict) else ()):
        spec = state.registry.get(node.get("type")) if isinstance(node, dict) and isinstance(node.get("type"), str) else None
        for inp in spec.inputs if spec is not None else ():
            value = (node.get("inputs") or {}).get(inp.name)
            if not inp.extra.get("image_upload") or not isinstance(value, str) or not value or "://" in value:
                continue
            name, kind = split_annotation(value, "input")
            subfolder, _, filename = name.rpartition("/")
            ref = {"filename": filename, "subfolder": subfolder, "type": kind}
            if ref not in found:
                found.append(ref)
    return found


def dependent_outputs(workflow: Workflow | None, node_ids: Iterable[str], registry: Any) -> dict[str, list[str]]:
    """For each node, the output nodes that need it (ComfyUI's ``dependent_outputs``)."""
    if workflow is None:
        return {}
    import networkx as nx

    graph = workflow.graph()
    outs = [n.id for n in workflow.nodes.values()
            if n.type and (spec := registry.get(n.type)) is not None and spec.output_node]
    result = {}
    for node_id in node_ids:
        if node_id not in graph:
            result[node_id] = []
            continue
        below = nx.descendants(graph, node_id) | {node_id}
        result[node_id] = [o for o in outs if o in below]
    return result
