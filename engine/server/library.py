"""The workflow library: the JSON files in ``workflows/``, listed, read, saved, deleted.

Names go through the workflows folder's :class:`~engine.paths.SafeRoot` like every
other file name, and must end in ``.json``. A save is checked first (it must
parse as a Kiln, ComfyUI API or ComfyUI editor workflow, so the library never
holds a file the editor cannot open) and written atomically (temporary file,
then rename), so a crash mid-save leaves the old version, never half a file.
Drafts with unconnected inputs are still saved: validation is the run's job.
"""
from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.paths import PathRefused, SafeRoot, atomic_write
from engine.server.http import fail, read_json
from engine.server.state import STATE
from engine.formats import parse_document
from engine.modes import apply_modes
from engine.workflow import WorkflowFormatError
from engine.workflow_ui import ConversionError, is_ui_format, to_kiln

MAX_NAME = 200


def _root(request: web.Request) -> SafeRoot:
    return request.app[STATE].env.paths.workflows


def workflow_path(root: SafeRoot, name: str) -> Path:
    """The file behind a library name, or a 400/403 that says why the name is refused."""
    if not name or len(name) > MAX_NAME:
        fail(400, "bad_name", f"a workflow name must be 1..{MAX_NAME} characters")
    if not name.lower().endswith(".json"):
        fail(400, "bad_name", f"a workflow name must end in .json: {name!r}")
    if any(part.startswith(".") for part in name.replace("\\", "/").split("/")):
        fail(400, "bad_name", f"a workflow name may not have hidden parts: {name!r}")
    try:
        return root.resolve(name)
    except PathRefused as exc:
        fail(403, "path_refused", str(exc))


def _iso(mtime: float) -> str:
    return datetime.fromtimestamp(mtime, tz=timezone.utc).isoformat(timespec="seconds")


def summary(root: SafeRoot, name: str) -> dict[str, Any]:
    """One library entry: name, title and description when the file has them, modified time."""
    path = root.resolve(name)
    stat = path.stat()
    entry: dict[str, Any] = {"name": name, "title": None, "description": None,
                             "modified": _iso(stat.st_mtime), "size": stat.st_size}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        entry["error"] = f"not readable as JSON: {exc}"
        return entry
    if isinstance(doc, dict):
        meta = doc.get("extra") if isinstance(doc.get("extra"), dict) else {}
        for key in ("title", "description"):
            value = doc.get(key, meta.get(key))
            if isinstance(value, str):
                entry[key] = value
    return entry


def list_library(root: SafeRoot) -> list[dict[str, Any]]:
    return [summary(root, name) for name in root.list([".json"])]


async def list_workflows(request: web.Request) -> web.Response:
    """``GET /api/workflows``: every workflow file with its title, description and modified time."""
    return web.json_response(await asyncio.to_thread(list_library, _root(request)))


async def get_workflow(request: web.Request) -> web.Response:
    """``GET /api/workflows/{name}``: the file as saved."""
    path = workflow_path(_root(request), request.match_info["name"])
    if not path.is_file():
        fail(404, "not_found", f"no workflow named {request.match_info['name']!r}")
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    return web.Response(text=text, content_type="application/json",
                        headers={"Last-Modified": _iso(path.stat().st_mtime)})


async def put_workflow(request: web.Request) -> web.Response:
    """``PUT /api/workflows/{name}``: save a workflow (201 when new, 200 when replaced)."""
    state = request.app[STATE]
    root = _root(request)
    name = request.match_info["name"]
    path = workflow_path(root, name)
    doc = await read_json(request, state.settings.max_body_bytes)
    try:
        parse_document(doc, state.registry)
    except (WorkflowFormatError, ValueError, KeyError, TypeError) as exc:
        fail(400, "invalid_workflow", f"not a workflow: {exc}")
    existed = path.is_file()
    await asyncio.to_thread(atomic_write, path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    body = await asyncio.to_thread(summary, root, root.relative(path))
    return web.json_response(body, status=200 if existed else 201)


async def delete_workflow(request: web.Request) -> web.Response:
    """``DELETE /api/workflows/{name}``: 204, or 404 when there is no such file."""
    path = workflow_path(_root(request), request.match_info["name"])
    if not path.is_file():
        fail(404, "not_found", f"no workflow named {request.match_info['name']!r}")
    await asyncio.to_thread(path.unlink)
    return web.Response(status=204)


async def convert_comfy_ui(request: web.Request) -> web.Response:
    """``POST /api/convert/comfyui``: a ComfyUI editor file as a Kiln document.

    Kiln's editor sends the editor files it opens here instead of converting them
    itself, so the browser and ``/prompt``/``kiln run`` share one converter.
    """
    state = request.app[STATE]
    doc = await read_json(request, state.settings.max_body_bytes)
    if not is_ui_format(doc):
        fail(400, "invalid_workflow", "not a ComfyUI editor workflow: expected an object with 'nodes' (a list) "
                                      "and 'links'")
    try:
        converted = await asyncio.to_thread(to_kiln, doc, state.registry)
    except ConversionError as exc:
        fail(400, "invalid_workflow", str(exc))
    return web.json_response(converted)


async def convert_to_api(request: web.Request) -> web.Response:
    """``POST /api/convert/api``: any workflow document as ComfyUI's API prompt, as it would run.

    ComfyUI's API format has no node modes, so muted and bypassed nodes are applied
    here (:func:`engine.modes.apply_modes`, the rule every run follows) rather than
    exported as if they ran; the editor's "Export API" uses this route.
    """
    state = request.app[STATE]
    doc = await read_json(request, state.settings.max_body_bytes)
    try:
        workflow = await asyncio.to_thread(parse_document, doc, state.registry)
    except WorkflowFormatError as exc:
        fail(400, "invalid_workflow", str(exc))
    return web.json_response(apply_modes(workflow, state.registry).to_api())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/convert/comfyui", convert_comfy_ui)
    app.router.add_post("/api/convert/api", convert_to_api)
    for prefix in ("/api", "/api/v1"):
        app.router.add_get(f"{prefix}/workflows", list_workflows)
        app.router.add_get(f"{prefix}/workflows/{{name:.+}}", get_workflow)
        app.router.add_put(f"{prefix}/workflows/{{name:.+}}", put_workflow)
        app.router.add_delete(f"{prefix}/workflows/{{name:.+}}", delete_workflow)
