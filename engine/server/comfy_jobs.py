"""ComfyUI's jobs API (``/api/jobs``, ComfyUI 0.6+) next to Kiln's own, which had the path first.

Both APIs use ``GET /api/jobs``, ``GET /api/jobs/{id}`` and ``POST /api/jobs/{id}/cancel``
with different shapes. Kiln's API also lives under ``/api/v1/`` (always Kiln's
shapes). On the shared, unversioned paths a request gets **ComfyUI's** shape when
it is recognisably ComfyUI's:

* it carries ComfyUI's ``Comfy-User`` header (ComfyUI's frontend sends it on every call),
* or it uses a query parameter only ComfyUI's API has (``sort_by``, ``sort_order``,
  ``workflow_id``), or a status only ComfyUI has (``pending``, ``in_progress``, ``completed``);

otherwise Kiln's shape, which is what Kiln's clients, written before the paths
were shared, expect. ``POST /api/jobs`` (submit) and ``POST /api/jobs/cancel``
(batch cancel) exist in one API only and need no choice.

Shapes follow ComfyUI's ``comfy_execution/jobs.py``: a job is ``{id, status,
priority, create_time, execution_start_time, execution_end_time, outputs_count,
preview_output, workflow_id, ...}`` with times in milliseconds; the list is
``{jobs, pagination: {offset, limit, total, has_more}}``.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiohttp import web

from engine.server import api_routes
from engine.server.comfy_routes import history_entry
from engine.server.http import read_json
from engine.server.state import STATE, AppState
from engine.server.store import (ACTIVE, CANCELLED, FAILED, INTERRUPTED, QUEUED, RUNNING, SUCCEEDED, TERMINAL,
                                 JobRecord)

PENDING, IN_PROGRESS, COMPLETED = "pending", "in_progress", "completed"
COMFY_STATUSES = (PENDING, IN_PROGRESS, COMPLETED, "failed", "cancelled")
#: Kiln's status -> ComfyUI's (an interrupted job is "cancelled" there, as in ComfyUI).
TO_COMFY = {QUEUED: PENDING, RUNNING: IN_PROGRESS, SUCCEEDED: COMPLETED, FAILED: "failed",
            INTERRUPTED: "cancelled", CANCELLED: "cancelled"}
COMFY_ONLY_PARAMS = ("sort_by", "sort_order", "workflow_id")
COMFY_ONLY_STATUSES = (PENDING, IN_PROGRESS, COMPLETED)
PREVIEWABLE = ("images", "video", "audio", "3d", "text")
HISTORY_CAP = 10000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wants_comfy(request: web.Request) -> bool:
    """The rule above: is this request one for ComfyUI's jobs API?"""
    if "Comfy-User" in request.headers:
        return True
    query = request.query
    if any(p in query for p in COMFY_ONLY_PARAMS):
        return True
    statuses = {s.strip().lower() for s in query.get("status", "").split(",")}
    return bool(statuses & set(COMFY_ONLY_STATUSES))


def _ms(t: float | None) -> int | None:
    return int(t * 1000) if t is not None else None


def _summary(outputs: dict[str, Any]) -> tuple[int, dict[str, Any] | None, int]:
    """(outputs_count, preview_output, previewable count), as ComfyUI's get_outputs_summary picks them."""
    count, previewable, preview, fallback = 0, 0, None, None
    for node_id, node_out in (outputs or {}).items():
        if not isinstance(node_out, dict):
            continue
        for media, items in node_out.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if media not in PREVIEWABLE:
                    continue
                previewable += 1
                enriched = {**item, "nodeId": node_id, "mediaType": item.get("mediaType", media)}
                if item.get("type") == "output" and preview is None:
                    preview = enriched
                elif fallback is None:
                    fallback = enriched
    return count, preview or fallback, previewable


def comfy_job(job: JobRecord, *, full: bool = False) -> dict[str, Any]:
    extra = job.extra_data or {}
    workflow = (extra.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra.get("extra_pnginfo"), dict) \
        else None
    count, preview, previewable = _summary(job.outputs if job.status in TERMINAL else {})
    out: dict[str, Any] = {
        "id": job.id, "status": TO_COMFY.get(job.status, job.status), "priority": job.comfy_number,
        "create_time": _ms(job.created), "execution_start_time": _ms(job.started),
        "execution_end_time": _ms(job.finished) if job.status in TERMINAL else None,
        "outputs_count": count, "previewable_outputs_count": previewable, "preview_output": preview,
        "workflow_id": workflow.get("id") if isinstance(workflow, dict) else None,
    }
    if job.status == FAILED and job.error:
        out["execution_error"] = {"node_id": job.error.get("node_id"), "node_type": job.error.get("node_type"),
                                  "exception_message": job.error.get("message"),
                                  "exception_type": job.error.get("exception_type"),
                                  "traceback": job.error.get("traceback") or []}
    out = {k: v for k, v in out.items() if v is not None}
    if full:
        out["workflow"] = {"prompt": job.prompt, "extra_data": extra}
        if job.status in TERMINAL:
            out["outputs"] = job.outputs
            out["execution_status"] = history_entry(job)["status"]
    return out


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def list_comfy_jobs(state: AppState, query: Any) -> web.Response:
    status_param = query.get("status")
    wanted = set(COMFY_STATUSES)
    if status_param:
        wanted = {s.strip().lower() for s in status_param.split(",") if s.strip()}
        bad = sorted(wanted - set(COMFY_STATUSES))
        if bad:
            return _bad(f"Invalid status value(s): {', '.join(bad)}. Valid values: {', '.join(COMFY_STATUSES)}")
    sort_by = query.get("sort_by", "created_at").lower()
    sort_order = query.get("sort_order", "desc").lower()
    if sort_by not in ("created_at", "execution_duration"):
        return _bad("sort_by must be 'created_at' or 'execution_duration'")
    if sort_order not in ("asc", "desc"):
        return _bad("sort_order must be 'asc' or 'desc'")
    limit = None
    if "limit" in query:
        try:
            limit = int(query["limit"])
        except ValueError:
            return _bad("limit must be an integer")
        if limit <= 0:
            return _bad("limit must be a positive integer")
    try:
        offset = max(0, int(query.get("offset", 0)))
    except ValueError:
        return _bad("offset must be an integer")
    records = [j for j in state.store.active() if TO_COMFY[j.status] in wanted]
    if wanted & {COMPLETED, "failed", "cancelled"}:
        records += [j for j in state.store.history(HISTORY_CAP) if TO_COMFY[j.status] in wanted]
    jobs = [comfy_job(j) for j in records]
    workflow_id = query.get("workflow_id")
    if workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]

    def key(job: dict[str, Any]) -> float:
        if sort_by == "execution_duration":
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            return end - start if start and end else 0
        return job.get("create_time", 0)

    jobs.sort(key=key, reverse=sort_order == "desc")
    total = len(jobs)
    page = jobs[offset:offset + limit if limit is not None else None]
    return web.json_response({"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total,
                                                           "has_more": offset + len(page) < total}},
                             dumps=api_routes._dumps)


def _cancel(state: AppState, job_id: str) -> bool:
    job = state.store.get(job_id)
    if job is None or job.status not in ACTIVE:
        return False  # finished or unknown: a no-op, as in ComfyUI
    return state.worker.cancel(job_id) is not None


# -- handlers (ComfyUI's shapes) ------------------------------------------------------------------

async def get_jobs(request: web.Request) -> web.Response:
    return list_comfy_jobs(request.app[STATE], request.query)


async def get_job(request: web.Request) -> web.Response:
    job = request.app[STATE].store.get(request.match_info["job_id"])
    if job is None:
        return web.json_response({"error": "Job not found"}, status=404)
    return web.json_response(comfy_job(job, full=True), dumps=api_routes._dumps)


async def cancel_job(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cancelled = _cancel(state, request.match_info["job_id"])
    if cancelled:
        state.hub.broadcast_status(state.store.count(ACTIVE))
    return web.json_response({"cancelled": cancelled})


async def cancel_jobs(request: web.Request) -> web.Response:
    """``POST /api/jobs/cancel`` ``{"job_ids": [...]}``: best effort, idempotent."""
    state = request.app[STATE]
    body = await read_json(request, state.settings.max_body_bytes)
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        return _bad("job_ids must be a list")
    invalid = [repr(i) for i in ids if not isinstance(i, str) or not i or len(i) > 200]
    if invalid:
        return web.json_response({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, status=400)
    cancelled = False
    for job_id in ids:
        cancelled = _cancel(state, job_id) or cancelled
    if cancelled:
        state.hub.broadcast_status(state.store.count(ACTIVE))
    return web.json_response({"cancelled": cancelled})


def _either(comfy: Handler, kiln: Handler) -> Handler:
    async def dispatch(request: web.Request) -> web.StreamResponse:
        return await (comfy if wants_comfy(request) else kiln)(request)

    dispatch.__doc__ = f"ComfyUI's {comfy.__name__} or Kiln's {kiln.__name__}, by the rule of this module."
    return dispatch


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/jobs", _either(get_jobs, api_routes.list_jobs))
    r.add_post("/api/jobs/cancel", cancel_jobs)
    r.add_get("/api/jobs/{job_id}", _either(get_job, api_routes.get_job))
    r.add_post("/api/jobs/{job_id}/cancel", _either(cancel_job, api_routes.cancel_job))
