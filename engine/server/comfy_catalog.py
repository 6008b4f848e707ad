"""What ComfyUI's frontend reads to fill its panels: models, folders, files, logs, templates, i18n.

Every model listing here is the node library's own (``Registry.list_models``), so
the model library panel, ``/models/{folder}`` and a loader's choices agree. The
templates are Kiln's shipped workflows (``workflows/`` next to the code), written
in ComfyUI's editor format with a generated thumbnail of the graph, in the index
format of ComfyUI's ``comfyui-workflow-templates`` package.

``/internal/*`` mirrors ComfyUI's frontend-only routes; nothing here reaches out
of the machine, and file names go through the same resolvers as every other route.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.paths import PathRefused, SafeRoot
from engine.server import api_routes
from engine.server.files import FOLDER_TYPES, folder_root
from engine.server.http import fail
from engine.server.state import STATE, AppState

#: Kiln's shipped workflows, offered as templates.
SHIPPED_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
TEMPLATE_MODULE = "default"
MAX_LOG_LINES = 2000
MAX_SAFETENSORS_HEADER = 8 * 1024 * 1024

class LogRing(logging.Handler):
    """The last log records, for ComfyUI's terminal panel (``/internal/logs``)."""

    def __init__(self, size: int = MAX_LOG_LINES) -> None:
        super().__init__(logging.INFO)
        self.entries: collections.deque[dict[str, str]] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
            self.entries.append({"t": stamp, "m": f"{record.levelname} {record.name}: {record.getMessage()}\n"})
        except Exception:  # a log handler must never raise
            pass


_LOGS: web.AppKey[LogRing] = web.AppKey("kiln_log_ring", LogRing)


# -- models ---------------------------------------------------------------------------------------

def _model_entries(state: AppState, folder: str) -> list[dict[str, Any]]:
    names = api_routes.list_models(state, folder)
    root = Path(state.env.paths.models.root) / folder
    out = []
    for name in names:
        try:
            st = (root / name).stat()
        except OSError:
            continue
        out.append({"name": name, "pathIndex": 0, "modified": st.st_mtime, "created": st.st_ctime,
                    "size": st.st_size})
    return out


async def experiment_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    root = Path(state.env.paths.models.root)
    folders = await asyncio.to_thread(api_routes.model_folder_names, state)
    return web.json_response([{"name": f, "folders": [str(root / f)]} for f in folders])


async def experiment_models_in(request: web.Request) -> web.Response:
    state = request.app[STATE]
    folder = request.match_info["folder"]
    try:
        return web.json_response(await asyncio.to_thread(_model_entries, state, folder))
    except PathRefused as exc:
        fail(400, "path_refused", str(exc))
    except FileNotFoundError:
        fail(404, "not_found", f"no model folder '{folder}'")


async def experiment_model_preview(request: web.Request) -> web.Response:
    """Kiln keeps no preview images for models: 404, which the frontend shows as no picture."""
    fail(404, "not_found", "no preview image for this model")


async def folder_paths(request: web.Request) -> web.Response:
    state = request.app[STATE]
    root = Path(state.env.paths.models.root)
    folders = await asyncio.to_thread(api_routes.model_folder_names, state)
    return web.json_response({f: [str(root / f)] for f in folders})


def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (size,) = struct.unpack("<Q", head)
        if size > MAX_SAFETENSORS_HEADER:
            return None
        try:
            header = json.loads(f.read(size))
        except ValueError:
            return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


async def view_metadata(request: web.Request) -> web.Response:
    """``/view_metadata/{folder}?filename=x.safetensors``: the file's ``__metadata__``, or 404."""
    state = request.app[STATE]
    folder, filename = request.match_info["folder"], request.query.get("filename", "")
    if not filename.endswith(".safetensors"):
        fail(404, "not_found", "only .safetensors files carry metadata")
    try:
        names = await asyncio.to_thread(api_routes.list_models, state, folder)
        path = state.env.paths.models.resolve(filename, folder)
    except PathRefused as exc:
        fail(403, "path_refused", str(exc))
    except FileNotFoundError:
        fail(404, "not_found", f"no model folder '{folder}'")
    if filename not in names or not path.is_file():
        fail(404, "not_found", f"no model {filename!r} in {folder}")
    meta = await asyncio.to_thread(_safetensors_metadata, path)
    if meta is None:
        fail(404, "not_found", f"{filename} has no metadata")
    return web.json_response(meta)


# -- files and logs ---------------------------------------------------------------------------

async def internal_files(request: web.Request) -> web.Response:
    """``/internal/files/{type}``: file names in input, output or temp, newest first (top level)."""
    kind = request.match_info["type"]
    if kind not in FOLDER_TYPES:
        return web.json_response({"error": "Invalid directory type"}, status=400)
    root = folder_root(request.app, kind)

    def names() -> list[str]:
        entries = [e for e in os.scandir(root.root) if e.is_file(follow_symlinks=False) and not e.name.startswith(".")]
        return [e.name for e in sorted(entries, key=lambda e: -e.stat().st_mtime)]

    return web.json_response(await asyncio.to_thread(names))


async def logs(request: web.Request) -> web.Response:
    ring = request.app[_LOGS]
    return web.json_response("".join(f"{e['t']} - {e['m']}" for e in ring.entries))


async def logs_raw(request: web.Request) -> web.Response:
    ring = request.app[_LOGS]
    return web.json_response({"entries": list(ring.entries), "size": {"cols": 80, "rows": 24}})


async def logs_subscribe(request: web.Request) -> web.Response:
    return web.Response(status=200)  # log lines are not pushed over the socket; the panel polls


# -- templates and the rest -----------------------------------------------------------------------

def shipped_workflows() -> dict[str, Path]:
    root = SafeRoot(SHIPPED_WORKFLOWS) if SHIPPED_WORKFLOWS.is_dir() else None
    return {Path(n).stem: root.resolve(n) for n in root.list([".json"]) if "/" not in n} if root else {}


def _template_doc(state: AppState, path: Path) -> dict[str, Any]:
    from engine.formats import parse_document as parse
    from engine.workflow_export import to_comfy_ui

    doc = json.loads(path.read_text(encoding="utf-8"))
    return to_comfy_ui(parse(doc, state.registry), state.registry, state.env)


def template_index(state: AppState) -> list[dict[str, Any]]:
    templates = []
    for name, path in sorted(shipped_workflows().items()):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        title = doc.get("title") if isinstance(doc.get("title"), str) else name.replace("-", " ").capitalize()
        templates.append({"name": name, "title": title, "mediaType": "image", "mediaSubtype": "png",
                          "description": doc.get("description") if isinstance(doc.get("description"), str)
                          else f"Kiln's {name} workflow", "tags": ["Kiln"], "models": [], "date": ""})
    return [{"moduleName": TEMPLATE_MODULE, "title": "Kiln", "type": "image", "category": "Kiln",
             "templates": templates}]


async def templates_file(request: web.Request) -> web.Response:
    """``/templates/index.json``, ``/templates/{name}.json`` and ``/templates/{name}-1.png``."""
    state = request.app[STATE]
    path = request.match_info["path"]
    if path == "index.json" or (path.startswith("index.") and path.endswith(".json") and path.count(".") == 2):
        return web.json_response(await asyncio.to_thread(template_index, state))
    if path == "index_logo.json":
        return web.json_response({})
    workflows = shipped_workflows()
    stem, ext = os.path.splitext(path)
    if ext == ".json" and stem in workflows:
        return web.json_response(await asyncio.to_thread(_template_doc, state, workflows[stem]))
    if ext == ".png" and stem.endswith("-1") and stem[:-2] in workflows:
        from engine.server.thumbnails import graph_thumbnail

        data = await asyncio.to_thread(graph_thumbnail, await asyncio.to_thread(
            _template_doc, state, workflows[stem[:-2]]))
        return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "max-age=300"})
    fail(404, "not_found", f"no template file {path!r}")


async def workflow_templates(request: web.Request) -> web.Response:
    """Templates of installed node packages (ComfyUI's custom-node templates): Kiln's are core ones."""
    return web.json_response({})


async def i18n(request: web.Request) -> web.Response:
    return web.json_response({})  # no extra translations: the frontend's own are complete


async def global_subgraphs(request: web.Request) -> web.Response:
    return web.json_response({})


def add_routes(app: web.Application) -> None:
    ring = LogRing()
    app[_LOGS] = ring
    for prefix in ("", "/api"):
        r = app.router
        r.add_get(f"{prefix}/experiment/models", experiment_models)
        r.add_get(f"{prefix}/experiment/models/{{folder}}", experiment_models_in)
        r.add_get(f"{prefix}/experiment/models/preview/{{folder}}/{{index}}/{{filename:.*}}",
                  experiment_model_preview)
        r.add_get(f"{prefix}/view_metadata/{{folder}}", view_metadata)
        r.add_get(f"{prefix}/workflow_templates", workflow_templates)
        r.add_get(f"{prefix}/i18n", i18n)
        r.add_get(f"{prefix}/global_subgraphs", global_subgraphs)
    r = app.router
    r.add_get("/internal/folder_paths", folder_paths)
    r.add_get("/internal/files/{type}", internal_files)
    r.add_get("/internal/logs", logs)
    r.add_get("/internal/logs/raw", logs_raw)
    r.add_patch("/internal/logs/subscribe", logs_subscribe)
    r.add_get("/templates/{path}", templates_file)

    async def attach(app: web.Application) -> None:
        logging.getLogger().addHandler(ring)

    async def detach(app: web.Application) -> None:
        logging.getLogger().removeHandler(ring)

    app.on_startup.append(attach)
    app.on_cleanup.append(detach)
