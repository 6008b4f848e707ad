"""``kiln serve --frontend comfyui``: ComfyUI's official frontend at ``/``, Kiln's editor at ``/kiln/``.

The frontend is the ``comfyui-frontend-package`` wheel (an optional extra:
``pip install 'kiln[comfyui-frontend]'``), a folder of built static files. It
talks to the server only through ComfyUI's routes, which Kiln serves in
ComfyUI's shapes (comfy_routes, comfy_jobs, comfy_user, comfy_catalog); it must
be served at the root because it derives its API base from its own path.

Nothing it does may leave the machine: the page is served with a Content
Security Policy that allows only this server, and the settings it reads on
start (``/settings``) default to the ones that turn its outside calls off (update
checks, telemetry, the model-download and template-hub prompts), unless the user
saved their own.
"""
from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.paths import PathRefused, SafeRoot
from engine.server.http import json_error

PACKAGE = "comfyui-frontend-package"
TESTED_VERSION = "1.58.1"
INSTALL_HINT = (f"ComfyUI's frontend is not installed. Install the tested version with\n"
                f"    pip install '{PACKAGE}=={TESTED_VERSION}'\n"
                f"(or: pip install 'kiln[comfyui-frontend]'), then run `kiln serve --frontend comfyui` again.")
#: Only this server: no CDN, no telemetry endpoint, no update check can be reached from the page.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; "
       "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
       "connect-src 'self' ws: wss: data: blob:; media-src 'self' blob: data:; worker-src 'self' blob:; "
       "frame-src 'self'; object-src 'none'")

#: Settings that keep the frontend from calling out, used until the user saves their own value.
OFFLINE_SETTINGS: dict[str, Any] = {
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.Memory.AllowManualUnload": True,
    "Comfy.InstalledVersion": TESTED_VERSION,
    "Comfy.Release.Version": TESTED_VERSION,
    "Comfy.Release.Status": "what's new seen",
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Templates.SelectedModels": [],
}

_ROOT: web.AppKey[SafeRoot] = web.AppKey("kiln_comfy_frontend_root", SafeRoot)


class FrontendMissing(RuntimeError):
    """The frontend package is not installed; the message says how to install it."""


def frontend_dir() -> Path:
    """The installed frontend's static folder, or :class:`FrontendMissing`."""
    try:
        import comfyui_frontend_package  # type: ignore[import-not-found]
    except ImportError:
        raise FrontendMissing(INSTALL_HINT) from None
    static = Path(comfyui_frontend_package.__file__).parent / "static"
    if not (static / "index.html").is_file():
        raise FrontendMissing(f"{PACKAGE} is installed but has no static/index.html.\n{INSTALL_HINT}")
    return static


def _headers(kind: str) -> dict[str, str]:
    return {"Content-Type": kind, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def index(request: web.Request) -> web.StreamResponse:
    root = request.app[_ROOT]
    headers = _headers("text/html; charset=utf-8")
    headers["Content-Security-Policy"] = CSP
    return web.FileResponse(root.resolve("index.html"), headers=headers)


async def static(request: web.Request) -> web.StreamResponse:
    """The frontend's files; anything else under an unknown path is a JSON 404."""
    name = request.match_info["path"]
    try:
        path = request.app[_ROOT].resolve(name, must_exist=True)
    except PathRefused as exc:
        return json_error(403, "path_refused", str(exc))
    except FileNotFoundError:
        return json_error(404, "not_found", f"no route or file {request.path}")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix in (".js", ".mjs"):
        kind = "text/javascript"
    return web.FileResponse(path, headers=_headers(kind))


async def to_kiln(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/kiln/")


def add_routes(app: web.Application, kiln_index: Any) -> None:
    """Mount the frontend at / (its files last, after every API route); Kiln's editor at /kiln/."""
    app[_ROOT] = SafeRoot(frontend_dir())
    app.router.add_get("/", index)
    app.router.add_get("/kiln", to_kiln)
    app.router.add_get("/kiln/", kiln_index)
    app.router.add_get("/{path:.+}", static)


def offline_defaults(settings: dict[str, Any], request: web.Request) -> dict[str, Any]:
    """The user's settings over the offline defaults, when this server serves the frontend."""
    if _ROOT not in request.app:
        return settings
    return {**OFFLINE_SETTINGS, **settings}
