"""What every server module shares, in one typed place: ``app[STATE]``.

Route modules (jobs, ComfyUI routes, files, workflows, OpenAPI) each expose
``add_routes(app)`` and read what they need from ``app[STATE]`` instead of
module globals, so two apps (two tests, two ports) in one process never share
a queue, a folder or a websocket.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from engine.batching import BATCH_JOBS_DEFAULT
from engine.context import Environment
from engine.registry import Registry

if TYPE_CHECKING:  # the concrete classes import this module's neighbours
    from engine.server.hub import Hub
    from engine.server.store import JobStore
    from engine.server.cluster import ClusterWorker
    from engine.server.worker import Worker

#: Repository folder holding the editor's static files.
WEB_DIR = Path(__file__).resolve().parents[2] / "web"


@dataclass
class ServerSettings:
    """Limits and switches of one server; defaults are the safe ones."""

    host: str = "127.0.0.1"
    port: int = 8188
    #: Bearer token required on every route when set (mandatory beyond loopback).
    token: str | None = None
    allow_url_images: bool = False
    #: Largest request body aiohttp accepts (JSON workflows, form fields).
    max_body_bytes: int = 8 * 1024 * 1024
    #: Largest uploaded image file, and the most pixels it may decode to.
    max_upload_bytes: int = 50 * 1024 * 1024
    max_upload_pixels: int = 8192 * 8192
    #: Most progress messages per second sent to one websocket (the last is always sent).
    progress_per_second: float = 10.0
    #: Characters of a failed job's traceback kept in its record and sent to clients;
    #: 0 (the default) keeps tracebacks in the server log only (``kiln serve --debug``).
    traceback_chars: int = 0
    #: A damaged job database is moved aside and an empty one started, instead of
    #: refusing to start (``kiln serve --move-damaged-db``).
    move_damaged_db: bool = False
    #: ComfyUI's ``--preview-method``: "none" (its default: no preview frames unless a
    #: job asks with ``extra_data.preview_method``), "auto", "latent2rgb" or "taesd".
    preview_method: str = "none"
    #: Queued jobs differing only in seeds that may run as one sampler batch (engine.server.batching);
    #: 1 runs every job alone (``kiln serve --batch-jobs``).
    batch_jobs: int = BATCH_JOBS_DEFAULT
    #: Seconds between writing a ComfyUI ``/prompt`` reply and sending the job's first websocket
    #: message (for clients that read the two on separate threads; Kiln's ``/api/jobs``
    #: sends at once: see engine.server.jobs.reply_then_release).
    event_grace_s: float = 0.05
    web_dir: Path = WEB_DIR
    #: The page at "/": Kiln's editor ("kiln"), or ComfyUI's official frontend ("comfyui",
    #: from the comfyui-frontend-package wheel) with Kiln's editor at /kiln/.
    frontend: str = "kiln"


@dataclass
class AppState:
    """The shared state of one running server (one per ``make_app`` call)."""

    env: Environment
    registry: Registry
    store: "JobStore"
    worker: "Worker | ClusterWorker"
    hub: "Hub"
    settings: ServerSettings = field(default_factory=ServerSettings)
    #: The server's data folder (queue database, input/output, per-user settings).
    data_dir: Path = Path("data")


STATE: web.AppKey[AppState] = web.AppKey("kiln", AppState)
