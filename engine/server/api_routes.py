"""Kiln's own API under ``/api/``: jobs, history, node schemas, models, cache.

Shapes are the team's contract (see /api/openapi.json): a job is
``{"id", "status", "progress", "outputs", "error", "created", "started", "finished", ...}``,
a refused submission is ``400 {"error": {...}, "errors": [every problem]}``.
"""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.model_files import folder_models
from engine.paths import PathRefused
from engine.server.http import fail, query_int, read_object
from engine.server.jobs import SubmitRefused, job_view, reply_then_release, submit_held
from engine.server.state import STATE, AppState
from engine.server.store import ACTIVE, RUNNING, TERMINAL

def refused_body(exc: SubmitRefused) -> dict[str, Any]:
    errors = [e.to_dict() for e in exc.errors]
    first = errors[0] if errors else {"type": "invalid_workflow", "message": "invalid workflow"}
    message = f"the workflow is invalid: {len(errors)} problem(s); first: {first['message']}"
    return {"error": {"type": "invalid_workflow" if len(errors) != 1 else first["type"], "message": message,
                      "details": "", "extra_info": {}},
            "errors": errors}


async def post_job(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request, state.settings.max_body_bytes)
    unknown = sorted(set(body) - {"workflow", "params", "force", "client_id", "outputs", "job_id", "extra_data",
                                  "keep_going"})
    if unknown:
        fail(400, "invalid_request", f"unknown field(s) {', '.join(unknown)}; expected workflow, params, force, "
                                     "keep_going, client_id, outputs")
    if not isinstance(body.get("keep_going", False), bool):
        fail(400, "invalid_request", "'keep_going' must be true or false")
    if "workflow" not in body:
        fail(400, "invalid_request", "'workflow' is required (Kiln or ComfyUI API format)")
    try:
        job_id = body.get("job_id")
        job = await submit_held(state, body["workflow"], str(uuid.uuid4()) if job_id is None else job_id,
                                params=body.get("params"), outputs=body.get("outputs"),
                                force=bool(body.get("force", False)), keep_going=body.get("keep_going", False),
                                client_id=body.get("client_id"), extra_data=body.get("extra_data"))
    except SubmitRefused as exc:
        return web.json_response(refused_body(exc), status=400)
    if job.status != RUNNING:  # a job a lane started at once was counted by that lane, with its events
        _status_changed(state)
    answer = {"job_id": job.id, "id": job.id, "status": job.status, "number": job.comfy_number}
    if job.ignored:
        answer["ignored"] = [e.to_dict() for e in job.ignored]
    reply = web.json_response(answer, status=201)
    return await reply_then_release(request, reply, state, job.id)


def _status_changed(state: AppState) -> None:
    state.hub.broadcast_status(state.store.count(ACTIVE))


async def get_job(request: web.Request) -> web.Response:
    state = request.app[STATE]
    job = state.store.get(request.match_info["job_id"])
    if job is None:
        fail(404, "not_found", f"no job with id '{request.match_info['job_id']}'")
    return web.json_response(job_view(state, job), dumps=_dumps)


async def list_jobs(request: web.Request) -> web.Response:
    state = request.app[STATE]
    status = request.query.get("status")
    statuses = tuple(s for s in (status or "").split(",") if s) or (*ACTIVE, *TERMINAL)
    bad = [s for s in statuses if s not in (*ACTIVE, *TERMINAL)]
    if bad:
        fail(400, "invalid_query", f"unknown status {', '.join(bad)}")
    limit = query_int(request, "limit", 100, minimum=1, maximum=10000)
    offset = query_int(request, "offset", 0)
    # Active jobs first (in run order), then finished ones newest first; only one page is read.
    active = [j for j in state.store.active() if j.status in statuses]
    finished_statuses = [s for s in statuses if s in TERMINAL]
    finished_total = state.store.count(finished_statuses) if finished_statuses else 0
    jobs = active[offset:offset + limit]
    if finished_statuses and len(jobs) < limit:
        jobs += state.store.history(limit - len(jobs), max(0, offset - len(active)), finished_statuses)
    return web.json_response({"jobs": [job_view(state, j, full=False) for j in jobs],
                              "total": len(active) + finished_total, "limit": limit, "offset": offset}, dumps=_dumps)


async def cancel_job(request: web.Request) -> web.Response:
    state = request.app[STATE]
    job_id = request.match_info["job_id"]
    job = state.store.get(job_id)
    if job is None:
        fail(404, "not_found", f"no job with id '{job_id}'")
    result = state.worker.cancel(job_id)
    if result is None:
        job = state.store.get(job_id)
        if job is not None and job.status in TERMINAL:
            return web.json_response({"id": job_id, "status": job.status, "cancelled": False,
                                      "message": f"the job already ended ({job.status})"}, status=409)
    job = state.store.get(job_id)
    return web.json_response({"id": job_id, "status": job.status if job else None, "cancelled": result is not None,
                              "interrupting": result == "interrupting"})


async def history(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limit = query_int(request, "limit", 50, minimum=1, maximum=10000)
    offset = query_int(request, "offset", 0)
    jobs = state.store.history(limit, offset)
    return web.json_response({"jobs": [job_view(state, j, full=False) for j in jobs],
                              "total": state.store.count(TERMINAL), "limit": limit, "offset": offset}, dumps=_dumps)


async def nodes(request: web.Request) -> web.Response:
    state = request.app[STATE]
    schemas = await asyncio.to_thread(state.registry.schemas, state.env)
    return web.json_response(schemas, dumps=_dumps)


def model_folder_names(state: AppState) -> list[str]:
    """Every model folder: those the node library reads, and any other present on disk."""
    root = Path(state.env.paths.models.root)
    present = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else set()
    return sorted(present | set(state.registry.model_folders))


def list_models(state: AppState, folder: str) -> list[str]:
    """The model names a loader accepts in one folder (the node library's one listing).

    The folder name itself goes through the models root's resolver first; an
    unknown folder (neither read by a node nor present) is FileNotFoundError.
    """
    if not folder or "/" in folder.strip("/") or "\\" in folder:
        raise PathRefused(f"a model folder is one name, not a path: {folder!r}")
    path = state.env.paths.models.resolve(folder)
    if folder not in state.registry.model_folders and not path.is_dir():
        raise FileNotFoundError(folder)
    return folder_models(state.env.paths.models.root, state.registry.model_folder_aliases.get(folder, folder))


async def models_in_folder(request: web.Request) -> web.Response:
    state = request.app[STATE]
    folder = request.match_info["folder"]
    try:
        names = await asyncio.to_thread(list_models, state, folder)
    except PathRefused as exc:
        fail(400, "path_refused", str(exc))
    except FileNotFoundError:
        fail(404, "not_found", f"no model folder '{folder}'")
    return web.json_response(names)


async def model_folders(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(model_folder_names, request.app[STATE]))


async def clear_cache(request: web.Request) -> web.Response:
    worker = request.app[STATE].worker
    before = await worker.clear_cache()
    return web.json_response({"cleared": before.get("entries", 0), "freed_bytes": before.get("bytes", 0),
                              "cache": await worker.cache_stats()})


async def post_free_models(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STATE].worker.free_models(), dumps=_dumps)


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


#: Kiln's versioned prefix: always Kiln's shapes (the unversioned /api/ paths are shared with
#: ComfyUI's routes; see engine.server.comfy_jobs for how a shared path picks its shape).
V1 = "/api/v1"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/jobs", post_job)
    # GET /api/jobs, GET /api/jobs/{id} and POST /api/jobs/{id}/cancel are shared with
    # ComfyUI's jobs API: comfy_jobs routes them. GET /api/history is shared likewise
    # with ComfyUI's history (comfy_routes).
    for prefix in ("/api", V1):
        r.add_get(f"{prefix}/nodes", nodes)
        r.add_get(f"{prefix}/models", model_folders)
        r.add_get(f"{prefix}/models/{{folder}}", models_in_folder)
        r.add_post(f"{prefix}/cache/clear", clear_cache)
        r.add_post(f"{prefix}/models/free", post_free_models)
    r.add_post(f"{V1}/jobs", post_job)
    r.add_get(f"{V1}/jobs", list_jobs)
    r.add_get(f"{V1}/jobs/{{job_id}}", get_job)
    r.add_post(f"{V1}/jobs/{{job_id}}/cancel", cancel_job)
    r.add_get(f"{V1}/history", history)
