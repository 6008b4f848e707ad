"""Building and running the server: ``make_app`` wires the parts, ``run_server`` serves them.

Startup stays cheap (about a second): the node registry imports node modules,
which import torch only inside their functions, and the model manager loads
nothing until a job needs a model. Route modules are independent; each exposes
``add_routes(app)`` and reads ``app[STATE]``.
"""
from __future__ import annotations

import asyncio
import logging
import mimetypes
import sqlite3
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from engine.cache import OutputCache
from engine.context import Environment, Paths, Settings, build_env
from engine.events import Event
from engine.guard import GuardRefused
from engine.paths import PathRefused, SafeRoot
from engine.registry import Registry, default_registry
from engine.server import (api_routes, comfy_catalog, comfy_frontend, comfy_jobs, comfy_routes, comfy_user, files,
                           library, openapi, security, ws)
from engine.server.http import json_error
from engine.server.hub import Hub
from engine.server.loop_calls import LoopCalls
from engine.server.previews import check_method, previews_enabled
from engine.batching import BATCH_JOBS_DEFAULT
from engine.server.state import STATE, AppState, ServerSettings
from engine.server.store import ACTIVE, JobRecord, JobStore, StoreDamaged
from engine.server.worker import Worker

log = logging.getLogger("kiln.server")

DB_NAME = "kiln.sqlite3"
#: How much of a failed job's traceback ``--debug`` keeps in its record.
DEBUG_TRACEBACK_CHARS = 16_000
#: Content types for the editor's static files (ES modules need a JS type).
STATIC_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
                ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
                ".woff2": "font/woff2", ".map": "application/json", ".txt": "text/plain"}


@web.middleware
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    """No request ends in an HTML error page or a dropped connection: API errors are JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404 and exc.content_type != "application/json" and request.path.startswith("/api/"):
            return json_error(404, "not_found", f"no route {request.method} {request.path}")
        if exc.status == 405 and exc.content_type != "application/json":
            return json_error(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except sqlite3.DatabaseError as exc:
        # A damaged page (or a full disk): this request cannot be answered, the
        # server and every route that does not need the damaged part keep working.
        log.error("%s %s: the job database failed: %s", request.method, request.path, exc)
        return json_error(503, "database_unavailable",
                          f"the job database cannot be read or written right now ({exc}); the server log "
                          "says more, and an operator can move the damaged file aside (kiln serve "
                          "--move-damaged-db)")
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal_error", f"{type(exc).__name__}: {exc}")


# -- the editor's static files ------------------------------------------------------------

#: The editor page's policy: its own scripts, styles, API and websocket only (no inline
#: script, no eval, no third-party origin), previews as blob: images, and never inside
#: a frame (clickjacking). ``connect-src 'self'`` covers the same-origin websocket.
EDITOR_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
              "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; "
              "frame-ancestors 'none'; object-src 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": EDITOR_CSP, "X-Frame-Options": "DENY",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

async def index(request: web.Request) -> web.StreamResponse:
    page = request.app[STATE].settings.web_dir / "index.html"
    if not page.is_file():
        return web.Response(text="Kiln server is running; the editor (web/index.html) is not installed.\n",
                            content_type="text/plain", headers=SECURITY_HEADERS)
    return web.FileResponse(page, headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache",
                                           **SECURITY_HEADERS})


async def static(request: web.Request) -> web.StreamResponse:
    root = SafeRoot(request.app[STATE].settings.web_dir)
    try:
        path = root.resolve(request.match_info["path"], must_exist=True)
    except PathRefused as exc:
        return json_error(403, "path_refused", str(exc))
    except FileNotFoundError:
        return json_error(404, "not_found", f"no file web/{request.match_info['path']}")
    kind = STATIC_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/json", "image/svg+xml"):
        kind += "; charset=utf-8"
    return web.FileResponse(path, headers={"Content-Type": kind, "Cache-Control": "no-cache", **SECURITY_HEADERS})


# -- building -----------------------------------------------------------------------------

def make_app(data_dir: str | Path, models_dir: str | Path | None = None, workflows_dir: str | Path | None = None,
             token: str | None = None, allow_url_images: bool = False, *, registry: Registry | None = None,
             settings: ServerSettings | None = None, env: Environment | None = None,
             devices: list[str] | None = None, host: str = "127.0.0.1", port: int = 8188,
             safety: tuple[str, str] | None = None, env_settings: Settings | None = None,
             cluster: str | None = None, cluster_timeout: float = 10.0, max_attempts: int = 3) -> web.Application:
    """A complete Kiln server app; the worker starts with the app and stops with it.

    ``safety`` = (mode, checker name) installs the node library's output guard on
    every job (engine.guard); it raises GuardRefused when that cannot be done, so a
    server asked to filter never runs unfiltered. ``env_settings`` carries what nodes
    see (the resource budget); URL images follow ``allow_url_images``.

    ``devices`` runs one in-process lane per device; ``cluster`` (a Dask scheduler
    address) sends jobs to ``kiln worker`` processes instead.
    """
    settings = settings or ServerSettings()
    settings.host, settings.port = host, port
    if token is not None:
        settings.token = token
    settings.allow_url_images = allow_url_images or settings.allow_url_images
    registry = registry if registry is not None else default_registry()
    if env is None:
        env_settings = env_settings or Settings()
        env_settings.allow_url_images = settings.allow_url_images
        if env_settings.compile_cache is None:
            env_settings.compile_cache = str(Path(data_dir) / "compiled")
        # The worker asks the model manager for the device before the first job.
        env = build_env(Paths.under(data_dir, models=models_dir, workflows=workflows_dir), env_settings, registry)
    elif env.models is None:
        env.models = registry.make_model_host(None, env.settings)
    if safety is not None and cluster:
        # The guard lives in the process that runs the nodes; Kiln workers do not build one yet.
        raise GuardRefused("the safety filter does not run on cluster workers yet; serve without --cluster")
    if safety is not None:
        env.output_guard = registry.make_output_guard(env, *safety)
    store = JobStore(Path(data_dir) / DB_NAME, move_damaged=settings.move_damaged_db)
    if store.moved_aside is not None:
        log.warning("the job database was damaged; it was moved to %s and an empty one started", store.moved_aside)
    hub = Hub()
    to_loop = LoopCalls()

    def on_event(job: JobRecord, event: Event) -> None:  # worker thread -> event loop
        to_loop.call(hub.publish, job.client_id, event, previews_enabled(settings.preview_method, job.extra_data))

    def on_queue_change() -> None:
        if to_loop.attached:
            to_loop.call(hub.broadcast_status, store.count(ACTIVE))

    worker: Any
    if cluster:
        from engine.server.cluster import ClusterWorker  # imports distributed only for a cluster server

        worker = ClusterWorker(store, registry, env, address=cluster, on_event=on_event,
                               on_queue_change=on_queue_change, max_attempts=max_attempts,
                               connect_timeout=cluster_timeout, traceback_chars=settings.traceback_chars)
    else:
        worker = Worker(store, registry, env, cache=OutputCache(), devices=devices, on_event=on_event,
                        on_queue_change=on_queue_change, traceback_chars=settings.traceback_chars,
                        wants_previews=lambda job: previews_enabled(settings.preview_method, job.extra_data),
                        batch_jobs=settings.batch_jobs, to_loop=to_loop)
    state = AppState(env=env, registry=registry, store=store, worker=worker, hub=hub, settings=settings,
                     data_dir=Path(data_dir))

    # Uploads stream past this; JSON routes read with their own, smaller limit.
    app = web.Application(client_max_size=max(settings.max_body_bytes, settings.max_upload_bytes + (1 << 20)),
                          middlewares=[*security.middlewares(), errors_as_json])
    app[STATE] = state

    app.router.add_get("/web/{path:.+}", static)
    for module in (api_routes, comfy_routes, comfy_jobs, comfy_user, comfy_catalog, ws, files, library, openapi):
        module.add_routes(app)
    if settings.frontend == "comfyui":
        comfy_frontend.add_routes(app, index)  # its catch-all for static files comes after every route
    else:
        app.router.add_get("/", index)

    async def start(app: web.Application) -> None:
        to_loop.attach(asyncio.get_running_loop())
        if store.recovered:
            log.warning("marked %d job(s) failed that were running when the server stopped: %s",
                        len(store.recovered), ", ".join(store.recovered))
        await worker.start()

    async def shutdown(app: web.Application) -> None:
        await hub.close_all()

    async def cleanup(app: web.Application) -> None:
        await worker.stop()
        to_loop.attach(None)
        store.close()

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    return app


def start_warm_up(app: web.Application) -> None:
    """Once the app listens: have its worker import the model libraries before the first job asks
    (Worker.warm_up). A cluster server runs no model in its own process, so it has nothing to warm."""
    state = app[STATE]
    if state.registry.warm_up is not None and isinstance(state.worker, Worker):
        state.worker.warm_up(state.registry.warm_up)


def run_server(host: str = "127.0.0.1", port: int = 8188, data_dir: str | Path = "data",
               models_dir: str | Path | None = "models", workflows_dir: str | Path | None = "workflows",
               token: str | None = None, allow_url_images: bool = False, *,
               registry: Registry | None = None, safety: tuple[str, str] | None = None,
               env_settings: Settings | None = None, debug: bool = False, move_damaged_db: bool = False,
               devices: list[str] | None = None, cluster: str | None = None, cluster_timeout: float = 10.0,
               max_attempts: int = 3, preview_method: str = "none",
               frontend: str = "kiln", batch_jobs: int = BATCH_JOBS_DEFAULT, warm_up: bool = True) -> None:
    """Serve until interrupted (``kiln serve``); refuses to start (exit 2) with a guard it cannot build
    or a damaged job database. ``warm_up``: once listening, import the model libraries before the
    first job asks (Worker.warm_up)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = security.resolve_token(token)
    try:
        security.check_bind(host, token)
    except security.BindRefused as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    if cluster:
        from engine.server.cluster import ClusterUnreachable, connect

        async def reachable() -> None:
            client = await connect(cluster, cluster_timeout)
            await client.close()
        try:
            asyncio.run(reachable())
        except ClusterUnreachable as exc:
            sys.stderr.write(f"error: {exc}\n")
            raise SystemExit(2) from None
    settings = ServerSettings(traceback_chars=DEBUG_TRACEBACK_CHARS if debug else 0,
                              move_damaged_db=move_damaged_db, preview_method=check_method(preview_method),
                              frontend=frontend, batch_jobs=batch_jobs)
    if frontend == "comfyui":
        try:
            comfy_frontend.frontend_dir()
        except comfy_frontend.FrontendMissing as exc:
            sys.stderr.write(f"error: {exc}\n")
            raise SystemExit(2) from None
    try:
        app = make_app(data_dir, models_dir, workflows_dir, token, allow_url_images, registry=registry,
                       host=host, port=port, safety=safety, env_settings=env_settings, settings=settings,
                       devices=devices, cluster=cluster, cluster_timeout=cluster_timeout, max_attempts=max_attempts)
    except GuardRefused as exc:
        sys.stderr.write(f"error: the safety filter cannot start: {exc}\n")
        raise SystemExit(2) from None
    except StoreDamaged as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    if safety is not None:
        log.info("safety filter on: every saved or previewed image is checked (%s)",
                 ", ".join(f"{k} {v}" for k, v in app[STATE].env.output_guard.describe().items()))
    shown = f"[{host}]" if ":" in host else host

    def ready(_: Any = None) -> None:
        print(f"Kiln serving on http://{shown}:{port}/ (data: {Path(data_dir).resolve()})", flush=True)
        if warm_up:
            start_warm_up(app)

    web.run_app(app, host=host, port=port, print=ready, access_log=None, handle_signals=True)
