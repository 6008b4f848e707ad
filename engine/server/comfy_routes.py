"""ComfyUI's HTTP routes with ComfyUI's shapes, served at ``/<path>`` and ``/api/<path>``.

Existing ComfyUI clients (scripts, krita-ai-diffusion, the ComfyUI frontend) talk
to Kiln through these unchanged. One clash is resolved by the query: Kiln's own
``GET /api/history?limit=&offset=`` answers in Kiln's shape, while ComfyUI's
frontend always sends ``max_items`` and gets ComfyUI's shape (``/history``
without the prefix is always ComfyUI's).
"""
from __future__ import annotations

import asyncio
import os
import platform
import sys
import uuid
from importlib import metadata
from typing import Any

from aiohttp import web

from engine.server import api_routes
from engine.server.http import query_int, read_object
from engine.server.jobs import SubmitRefused, dependent_outputs, reply_then_release, submit_held
from engine.server.state import STATE, AppState
from engine.server.store import ACTIVE, RUNNING, SUCCEEDED, TERMINAL, JobRecord
from engine.validate import UNKNOWN_NODE_TYPE

# -- /prompt ------------------------------------------------------------------------------


def comfy_refusal(state: AppState, exc: SubmitRefused) -> dict[str, Any]:
    """ComfyUI's 400 body: a top-level error plus per-node errors."""
    node_level = [e for e in exc.errors if e.node_id is not None and e.type != UNKNOWN_NODE_TYPE]
    unknown = [e for e in exc.errors if e.type == UNKNOWN_NODE_TYPE]
    general = [e for e in exc.errors if e.node_id is None]
    node_errors: dict[str, Any] = {}
    deps = dependent_outputs(exc.workflow, {e.node_id for e in node_level}, state.registry)
    for e in node_level:
        entry = node_errors.setdefault(e.node_id, {"errors": [], "dependent_outputs": deps.get(e.node_id, []),
                                                   "class_type": e.node_type})
        entry["errors"].append({"type": e.type, "message": e.message, "details": e.details or e.message,
                                "extra_info": e.to_dict()["extra_info"]})
    if unknown:
        e = unknown[0]
        error = {"type": "invalid_prompt", "message": f"Cannot execute because node {e.node_type} does not exist.",
                 "details": f"Node ID '#{e.node_id}'", "extra_info": {}}
    elif general:
        e = general[0]
        kind = e.type if e.type in ("prompt_no_outputs", "no_prompt") else "invalid_prompt"
        error = {"type": kind, "message": e.message, "details": e.details, "extra_info": {}}
    else:
        error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                 "details": "", "extra_info": {}}
    return {"error": error, "node_errors": node_errors}


async def post_prompt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request, state.settings.max_body_bytes)
    prompt = body.get("prompt")
    if not isinstance(prompt, dict):
        return web.json_response({"error": {"type": "no_prompt", "message": "No prompt provided",
                                            "details": "No prompt provided", "extra_info": {}},
                                  "node_errors": {}}, status=400)
    extra = body.get("extra_data")  # malformed extra data is refused by submit, as on /api/jobs
    client_id = body.get("client_id") if isinstance(body.get("client_id"), str) else None
    number = body.get("number")
    if number is not None and (not isinstance(number, (int, float)) or isinstance(number, bool)):
        number = None
    targets = body.get("partial_execution_targets")
    prompt_id = body.get("prompt_id") if isinstance(body.get("prompt_id"), str) and body.get("prompt_id") else None
    try:
        job = await submit_held(state, prompt, prompt_id or str(uuid.uuid4()),
                                outputs=targets if isinstance(targets, list) and targets else None,
                                client_id=client_id, number=number, front=bool(body.get("front")), extra_data=extra)
    except SubmitRefused as exc:
        return web.json_response(comfy_refusal(state, exc), status=400)
    state.hub.broadcast_status(state.store.count(ACTIVE))
    reply = web.json_response({"prompt_id": job.id, "number": job.comfy_number, "node_errors": {}})
    return await reply_then_release(request, reply, state, job.id, state.settings.event_grace_s)


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": request.app[STATE].store.count(ACTIVE)}})


# -- /queue and /interrupt ----------------------------------------------------------------


def queue_item(job: JobRecord) -> list[Any]:
    return [job.comfy_number, job.id, job.prompt, job.extra_data, job.outputs_to_execute]


async def get_queue(request: web.Request) -> web.Response:
    jobs = request.app[STATE].store.active()
    return web.json_response({"queue_running": [queue_item(j) for j in jobs if j.status == RUNNING],
                              "queue_pending": [queue_item(j) for j in jobs if j.status != RUNNING]})


async def post_queue(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request, state.settings.max_body_bytes, allow_empty=True)
    if body.get("clear"):
        for job in state.store.active():
            if job.status != RUNNING:
                state.worker.cancel(job.id)
    delete = body.get("delete")
    if isinstance(delete, list):
        for job_id in delete:
            job = state.store.get(str(job_id))
            if job is not None and job.status not in (RUNNING, *TERMINAL):
                state.worker.cancel(job.id)
    state.hub.broadcast_status(state.store.count(ACTIVE))
    return web.Response(status=200)


async def post_interrupt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request, state.settings.max_body_bytes, allow_empty=True)
    prompt_id = body.get("prompt_id")
    if isinstance(prompt_id, str) and prompt_id:
        if prompt_id in state.worker.running():  # ComfyUI ignores an id that is not running
            state.worker.cancel(prompt_id)
    else:
        state.worker.interrupt_all()
    return web.Response(status=200)


async def post_free(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request, state.settings.max_body_bytes, allow_empty=True)
    if body.get("unload_models") or body.get("free_memory"):
        await state.worker.free_models()
    if body.get("free_memory"):
        await state.worker.clear_cache()
    return web.Response(status=200)


# -- /history -----------------------------------------------------------------------------


def history_entry(job: JobRecord) -> dict[str, Any]:
    status_str = "success" if job.status == SUCCEEDED else "error"
    meta = {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
            for node_id in job.outputs}
    return {"prompt": queue_item(job), "outputs": job.outputs,
            "status": {"status_str": status_str, "completed": job.status == SUCCEEDED,
                       "messages": job.messages},
            "meta": meta}


async def get_history(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.path.startswith("/api/") and "max_items" not in request.query and (
            "limit" in request.query or "offset" in request.query or not request.query):
        return await api_routes.history(request)
    max_items = query_int(request, "max_items", None, minimum=0)
    offset = query_int(request, "offset", -1, minimum=-1)
    total = state.store.count(TERMINAL)
    if offset == -1:
        offset = max(0, total - max_items) if max_items is not None else 0
    jobs = state.store.history(max_items, offset, newest_first=False)
    return web.json_response({j.id: history_entry(j) for j in jobs}, dumps=api_routes._dumps)


async def get_history_item(request: web.Request) -> web.Response:
    job = request.app[STATE].store.get(request.match_info["prompt_id"])
    if job is None or job.status not in TERMINAL:
        return web.json_response({})  # ComfyUI answers {} for an unknown or unfinished prompt
    return web.json_response({job.id: history_entry(job)}, dumps=api_routes._dumps)


async def post_history(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request, state.settings.max_body_bytes, allow_empty=True)
    if body.get("clear"):
        state.store.delete_finished()
    if isinstance(body.get("delete"), list):
        state.store.delete_finished([str(i) for i in body["delete"]])
    return web.Response(status=200)


# -- node info and the system ---------------------------------------------------------------


async def object_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await asyncio.to_thread(state.registry.object_info, state.env)
    return web.json_response(info, dumps=api_routes._dumps)


async def object_info_one(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["node_class"]
    spec = state.registry.get(name)
    if spec is None:
        return web.json_response({})  # ComfyUI's answer for an unknown class
    return web.json_response({name: spec.object_info(name if name != spec.type else None, env=state.env)},
                             dumps=api_routes._dumps)


def _torch_version() -> str:
    module = sys.modules.get("torch")  # never import torch just to report it
    if module is not None:
        return str(module.__version__)
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ""


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


def system_stats_body(state: AppState) -> dict[str, Any]:
    total, free = _memory()
    torch = sys.modules.get("torch")
    devices = []
    for index, device in enumerate(state.worker.devices() or [state.env.device or "cpu"]):
        vram_total = vram_free = 0
        if torch is not None and device.startswith("cuda"):
            try:
                vram_free, vram_total = torch.cuda.mem_get_info(device)
            except Exception:
                pass
        devices.append({"name": device, "type": device.split(":")[0], "index": index,
                        "vram_total": vram_total or total, "vram_free": vram_free or free,
                        "torch_vram_total": vram_total, "torch_vram_free": vram_free})
    return {
        "system": {"os": os.name, "platform": platform.platform(), "python_version": sys.version,
                   "embedded_python": False, "comfyui_version": "kiln-" + _kiln_version(),
                   "pytorch_version": _torch_version(), "argv": sys.argv, "ram_total": total, "ram_free": free,
                   "torch_loaded": torch is not None},
        "devices": devices,
    }


def _kiln_version() -> str:
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        return "0"


async def system_stats(request: web.Request) -> web.Response:
    return web.json_response(system_stats_body(request.app[STATE]))


async def embeddings(request: web.Request) -> web.Response:
    try:
        names = await asyncio.to_thread(api_routes.list_models, request.app[STATE], "embeddings")
    except (FileNotFoundError, ValueError):
        names = []
    return web.json_response([n.rsplit(".", 1)[0] for n in names])


async def extensions(request: web.Request) -> web.Response:
    return web.json_response([])  # Kiln loads no frontend extensions, and no route installs code


async def features(request: web.Request) -> web.Response:
    return web.json_response({"supports_preview_metadata": False, "max_upload_size":
                              request.app[STATE].settings.max_upload_bytes})


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        r = app.router
        r.add_post(f"{prefix}/prompt", post_prompt)
        r.add_get(f"{prefix}/prompt", get_prompt)
        r.add_get(f"{prefix}/queue", get_queue)
        r.add_post(f"{prefix}/queue", post_queue)
        r.add_post(f"{prefix}/interrupt", post_interrupt)
        r.add_post(f"{prefix}/free", post_free)
        r.add_post(f"{prefix}/history", post_history)
        r.add_get(f"{prefix}/history/{{prompt_id}}", get_history_item)
        r.add_get(f"{prefix}/object_info", object_info)
        r.add_get(f"{prefix}/object_info/{{node_class}}", object_info_one)
        r.add_get(f"{prefix}/system_stats", system_stats)
        r.add_get(f"{prefix}/embeddings", embeddings)
        r.add_get(f"{prefix}/extensions", extensions)
        r.add_get(f"{prefix}/features", features)
    app.router.add_get("/history", get_history)
    app.router.add_get("/api/history", get_history)  # Kiln's shape unless max_items is given
    # ComfyUI's /models/{folder} is the same list as Kiln's /api/models/{folder}
    app.router.add_get("/models", api_routes.model_folders)
    app.router.add_get("/models/{folder}", api_routes.models_in_folder)

