"""ComfyUI's per-user routes: ``/users``, ``/settings``, ``/userdata`` and ``/v2/userdata``.

Kiln runs in ComfyUI's single-user mode: one user, ``default``, whose files live in
``DATA/user/default/``. One folder is shared instead of copied: ``workflows/`` in
user data *is* Kiln's workflow library (``--workflows``), so a workflow saved in
ComfyUI's frontend opens in Kiln's editor and the other way round. A Kiln-format
file read through user data comes back in ComfyUI's editor format (converted on
the fly, the file is not touched), since that is the only format the frontend's
workflow panel opens.

Every path goes through the folder's :class:`~engine.paths.SafeRoot` (``..``,
absolute paths, percent-encoded tricks and symlinks out are refused with 403),
bodies are size-capped (413), and files are written atomically. Settings ids are
keys of one JSON file, never paths; an id that looks like one is still refused.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.paths import PathRefused, SafeRoot, atomic_write
from engine.server.comfy_frontend import offline_defaults
from engine.server.http import fail, read_json
from engine.server.state import STATE, AppState

USER = "default"
SETTINGS_FILE = "comfy.settings.json"
WORKFLOWS = "workflows"
#: Settings are a small JSON object; user-data files are workflows and the like.
MAX_SETTINGS_BYTES = 1024 * 1024
MAX_USERDATA_BYTES = 16 * 1024 * 1024
_SETTING_ID = re.compile(r"^[A-Za-z0-9_.\-:@ ]{1,200}$")
_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("kiln_userdata_lock", asyncio.Lock)


#: Files the frontend reads at start whether or not the user ever wrote them, with the
#: content an absent one stands for (so a fresh server answers them instead of a 404).
ABSENT_DEFAULTS = {"user.css": (b"", "text/css"), "comfy.templates.json": (b"[]", "application/json"),
                   "workflows/.index.json": (b'{"favorites": []}', "application/json")}
#: Folders the frontend lists at start (ComfyUI creates them on first use).
STANDARD_DIRS = ("subgraphs",)


def user_root(state: AppState) -> SafeRoot:
    root = SafeRoot(state.data_dir / "user" / USER, create=True)
    for name in STANDARD_DIRS:
        (root.root / name).mkdir(exist_ok=True)
    return root


def _locate(state: AppState, name: str) -> tuple[SafeRoot, str]:
    """The root and the name inside it that a user-data path refers to."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if parts and parts[0] == WORKFLOWS:
        return state.env.paths.workflows, "/".join(parts[1:])
    return user_root(state), name


def user_path(state: AppState, name: str) -> Path:
    """The file behind a user-data name, or 400/403 that says why not."""
    if not name or len(name) > 500:
        fail(400, "bad_name", "a user-data path must be 1..500 characters")
    root, inner = _locate(state, name)
    try:
        path = root.resolve(inner) if inner else root.root
    except PathRefused as exc:
        fail(403, "path_refused", str(exc))
    return path


def _file_info(path: Path, relative_to: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": path.relative_to(relative_to).as_posix(), "size": st.st_size, "modified": st.st_mtime,
            "created": st.st_ctime}


# -- users and settings -----------------------------------------------------------------------

async def get_users(request: web.Request) -> web.Response:
    """Single-user mode, as ComfyUI answers without ``--multi-user``."""
    return web.json_response({"storage": "server", "migrated": True})


async def post_users(request: web.Request) -> web.Response:
    fail(400, "single_user", "this server runs in single-user mode; there is one user, 'default'")


def _read_settings(state: AppState) -> dict[str, Any]:
    path = user_root(state).resolve(SETTINGS_FILE)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged file reads as no settings; the next save replaces it whole
    return doc if isinstance(doc, dict) else {}


def _write_settings(state: AppState, settings: dict[str, Any]) -> None:
    atomic_write(user_root(state).resolve(SETTINGS_FILE), json.dumps(settings, indent=2).encode())


def _setting_id(request: web.Request) -> str:
    setting = request.match_info["id"]
    if not _SETTING_ID.match(setting) or ".." in setting:
        fail(400, "bad_setting_id", f"a setting id is a dotted name like 'Comfy.Locale', not {setting[:80]!r}")
    return setting


async def get_settings(request: web.Request) -> web.Response:
    settings = await asyncio.to_thread(_read_settings, request.app[STATE])
    return web.json_response(offline_defaults(settings, request))


async def get_setting(request: web.Request) -> web.Response:
    settings = await asyncio.to_thread(_read_settings, request.app[STATE])
    return web.json_response(offline_defaults(settings, request).get(_setting_id(request)))


async def post_settings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request, MAX_SETTINGS_BYTES)
    if not isinstance(body, dict):
        fail(400, "invalid_json", "settings must be a JSON object of id -> value")
    bad = [k for k in body if not _SETTING_ID.match(k) or ".." in k]
    if bad:
        fail(400, "bad_setting_id", f"invalid setting id(s): {', '.join(repr(k[:80]) for k in bad[:5])}")
    async with request.app[_LOCK]:
        settings = await asyncio.to_thread(_read_settings, state)
        merged = {**settings, **body}
        if len(json.dumps(merged)) > MAX_SETTINGS_BYTES:
            fail(413, "too_large", f"settings would exceed {MAX_SETTINGS_BYTES} bytes", limit=MAX_SETTINGS_BYTES)
        await asyncio.to_thread(_write_settings, state, merged)
    return web.Response(status=200)


async def post_setting(request: web.Request) -> web.Response:
    state = request.app[STATE]
    setting = _setting_id(request)
    value = await read_json(request, MAX_SETTINGS_BYTES)
    async with request.app[_LOCK]:
        settings = await asyncio.to_thread(_read_settings, state)
        settings[setting] = value
        if len(json.dumps(settings)) > MAX_SETTINGS_BYTES:
            fail(413, "too_large", f"settings would exceed {MAX_SETTINGS_BYTES} bytes", limit=MAX_SETTINGS_BYTES)
        await asyncio.to_thread(_write_settings, state, settings)
    return web.Response(status=200)


# -- user data --------------------------------------------------------------------------------

def _list_dir(state: AppState, directory: str, recurse: bool) -> tuple[Path, list[Path]]:
    base = user_path(state, directory)
    if not base.is_dir():
        raise FileNotFoundError(directory)
    root, _ = _locate(state, directory)
    found = []
    walker = os.walk(base) if recurse else [(str(base), [], [e.name for e in os.scandir(base) if e.is_file()])]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                root.resolve(root.relative(path), must_exist=True)
            except (PathRefused, FileNotFoundError, ValueError):
                continue  # a symlink leading out is not listed
            found.append(path)
    return base, found


async def list_userdata(request: web.Request) -> web.Response:
    """``GET /userdata?dir=&recurse=&full_info=&split=`` (ComfyUI's v1 listing)."""
    query = request.query
    directory = query.get("dir", "")
    if not directory:
        fail(400, "missing_dir", "the 'dir' query parameter is required")
    try:
        base, files = await asyncio.to_thread(_list_dir, request.app[STATE], directory,
                                              query.get("recurse", "").lower() == "true")
    except FileNotFoundError:
        fail(404, "not_found", f"no user-data folder {directory!r}")
    if query.get("full_info", "").lower() == "true":
        return web.json_response([_file_info(p, base) for p in files])
    rel = [p.relative_to(base).as_posix() for p in files]
    if query.get("split", "").lower() == "true":
        return web.json_response([[r, *r.split("/")] for r in rel])
    return web.json_response(rel)


async def list_userdata_v2(request: web.Request) -> web.Response:
    """``GET /v2/userdata?path=``: files and folders with their type, size and modified time."""
    state = request.app[STATE]
    rel = request.query.get("path", "")

    def walk() -> list[dict[str, Any]]:
        base = user_root(state).root if not rel else user_path(state, rel)
        if not base.exists():
            if not rel:
                return []
            raise FileNotFoundError(rel)
        if not base.is_dir():
            raise NotADirectoryError(rel)
        prefix = rel.strip("/")
        out: list[dict[str, Any]] = []
        entries = sorted(os.scandir(base), key=lambda e: e.name.lower())
        names = {e.name for e in entries}
        if not prefix:  # the shared workflow library appears as user data's workflows/
            if WORKFLOWS not in names:
                out.append({"name": WORKFLOWS, "path": WORKFLOWS, "type": "directory"})
        for e in entries:
            if e.name.startswith("."):
                continue
            path = f"{prefix}/{e.name}" if prefix else e.name
            if e.is_dir():
                out.append({"name": e.name, "path": path, "type": "directory"})
            elif e.is_file():
                st = e.stat()
                out.append({"name": e.name, "path": path, "type": "file", "size": st.st_size,
                            "modified": st.st_mtime})
        out.sort(key=lambda x: (x["type"] != "directory", x["name"].lower()))
        return out

    try:
        return web.json_response(await asyncio.to_thread(walk))
    except FileNotFoundError:
        fail(404, "not_found", f"no user-data path {rel!r}")
    except NotADirectoryError:
        fail(400, "not_a_directory", f"{rel!r} is a file, not a folder")


def _as_editor_format(state: AppState, path: Path, data: bytes) -> bytes:
    """A Kiln-format workflow in the library, as ComfyUI's editor format; anything else unchanged."""
    if path.suffix.lower() != ".json" or not path.is_relative_to(state.env.paths.workflows.root):
        return data
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    if not (isinstance(doc, dict) and isinstance(doc.get("nodes"), dict)):
        return data
    from engine.workflow import WorkflowFormatError, parse
    from engine.workflow_export import to_comfy_ui

    try:
        return json.dumps(to_comfy_ui(parse(doc), state.registry, state.env)).encode()
    except (WorkflowFormatError, ValueError, KeyError, TypeError):
        return data


async def get_userdata(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["file"]
    path = user_path(state, name)
    if not path.is_file():
        if name in ABSENT_DEFAULTS:
            body, kind = ABSENT_DEFAULTS[name]
            return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"})
        fail(404, "not_found", f"no user-data file {name!r}")
    data = await asyncio.to_thread(path.read_bytes)
    data = await asyncio.to_thread(_as_editor_format, state, path, data)
    kind = "application/json" if path.suffix.lower() == ".json" else "application/octet-stream"
    if path.suffix.lower() == ".css":
        kind = "text/css"
    return web.Response(body=data, content_type=kind, headers={"X-Content-Type-Options": "nosniff",
                                                               "Cache-Control": "no-cache"})


async def _read_body(request: web.Request) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_USERDATA_BYTES:
        fail(413, "too_large", f"user-data file of {length} bytes exceeds {MAX_USERDATA_BYTES}",
             limit=MAX_USERDATA_BYTES, size=length)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_USERDATA_BYTES:
            fail(413, "too_large", f"user-data file exceeds {MAX_USERDATA_BYTES} bytes", limit=MAX_USERDATA_BYTES)
        chunks.append(chunk)
    return b"".join(chunks)


def _reply_for(state: AppState, name: str, path: Path, full_info: bool) -> Any:
    root, _ = _locate(state, name)
    base = user_root(state).root
    info = _file_info(path, root.root)
    if root.root != base:  # a library file: its user-data path carries the workflows/ prefix
        info["path"] = f"{WORKFLOWS}/{info['path']}"
    return info if full_info else info["path"]


async def post_userdata(request: web.Request) -> web.Response:
    """``POST /userdata/{file}?overwrite=&full_info=``: the raw body becomes the file."""
    state = request.app[STATE]
    name = request.match_info["file"]
    path = user_path(state, name)
    if path.is_dir():
        fail(400, "is_a_directory", f"{name!r} is a folder")
    overwrite = request.query.get("overwrite", "true") != "false"
    data = await _read_body(request)
    async with request.app[_LOCK]:
        if not overwrite and path.exists():
            fail(409, "exists", f"{name!r} already exists")
        await asyncio.to_thread(atomic_write, path, data)
    return web.json_response(_reply_for(state, name, path, request.query.get("full_info", "").lower() == "true"))


async def delete_userdata(request: web.Request) -> web.Response:
    state = request.app[STATE]
    path = user_path(state, request.match_info["file"])
    if not path.is_file():
        fail(404, "not_found", f"no user-data file {request.match_info['file']!r}")
    await asyncio.to_thread(path.unlink)
    return web.Response(status=204)


async def move_userdata(request: web.Request) -> web.Response:
    """``POST /userdata/{file}/move/{dest}?overwrite=&full_info=``."""
    state = request.app[STATE]
    source = user_path(state, request.match_info["file"])
    dest_name = request.match_info["dest"]
    dest = user_path(state, dest_name)
    if not source.is_file():
        fail(404, "not_found", f"no user-data file {request.match_info['file']!r}")
    overwrite = request.query.get("overwrite", "true") != "false"
    async with request.app[_LOCK]:
        if not overwrite and dest.exists():
            fail(409, "exists", f"{dest_name!r} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.move, source, dest)
    return web.json_response(_reply_for(state, dest_name, dest, request.query.get("full_info", "").lower() == "true"))


async def user_css(request: web.Request) -> web.Response:
    """``/user.css``: the user's stylesheet, empty when there is none."""
    path = user_root(request.app[STATE]).resolve("user.css")
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return web.Response(text=text, content_type="text/css")


def add_routes(app: web.Application) -> None:
    app[_LOCK] = asyncio.Lock()
    for prefix in ("", "/api"):
        r = app.router
        r.add_get(f"{prefix}/users", get_users)
        r.add_post(f"{prefix}/users", post_users)
        r.add_get(f"{prefix}/settings", get_settings)
        r.add_post(f"{prefix}/settings", post_settings)
        r.add_get(f"{prefix}/settings/{{id}}", get_setting)
        r.add_post(f"{prefix}/settings/{{id}}", post_setting)
        r.add_get(f"{prefix}/userdata", list_userdata)
        r.add_get(f"{prefix}/v2/userdata", list_userdata_v2)
        r.add_get(f"{prefix}/userdata/{{file}}", get_userdata)
        r.add_post(f"{prefix}/userdata/{{file}}", post_userdata)
        r.add_delete(f"{prefix}/userdata/{{file}}", delete_userdata)
        r.add_post(f"{prefix}/userdata/{{file}}/move/{{dest}}", move_userdata)
    app.router.add_get("/user.css", user_css)
