"""Shared helpers for the editor's browser tests: Debian's Chromium driven by Playwright.

The browser is launched from ``/usr/bin/chromium`` (never a downloaded one). CI
installs it (``make browser``), so a missing Chromium fails the tests with the
command that installs it rather than skipping them.
"""
from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web
from PIL import Image

from server_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 2200, "height": 1200}  # the shipped img2img fits at a readable zoom
RUN_TIMEOUT_MS = 90_000
ARTIFACTS = REPO / "test-artifacts"  # screenshots of the editor's states (ignored by git)


def chromium_path() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium") or ""
    if not path:
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make browser` (apt-get install chromium)")
    return path


def launch_browser() -> Iterator[Any]:
    """A headless Chromium for one test module; closed afterwards."""
    from playwright import sync_api
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-smooth-scrolling"])
        try:
            yield browser
        finally:
            browser.close()


def serve_repo(page: Any, origin: str = "http://kiln.test") -> None:
    """Answer every request to ``origin`` with the repository's files, no server needed.

    Lets the editor's ES modules (and tests/js) be imported in the page as a
    server would serve them, with a JavaScript content type.
    """

    def handle(route: Any) -> None:
        path = route.request.url[len(origin):].split("?", 1)[0].lstrip("/")
        if not path:
            route.fulfill(status=200, content_type="text/html", body="<!doctype html><title>kiln tests</title>")
            return
        target = (REPO / path).resolve()
        if REPO not in target.parents or not target.is_file():
            route.fulfill(status=404, body="not found")
            return
        kind = "text/javascript" if target.suffix in (".js", ".mjs") else mimetypes.guess_type(target.name)[0]
        route.fulfill(status=200, content_type=kind or "application/octet-stream", body=target.read_bytes())

    page.route(f"{origin}/**", handle)


# -- a real kiln serve for the editor ----------------------------------------------------

TINY_CKPT = "tiny-sd1.safetensors"
DEMO_CKPT = "kiln-demo-random-weights.safetensors"  # what nodes/demo.py puts in a fresh models folder


# -- the server --------------------------------------------------------------------------------

def tiny_img2img(title: str = "Image to image", strength: float = 0.6) -> dict[str, Any]:
    """The repository's img2img.json, shrunk to the tiny model: 64 px, 3 steps."""
    doc = json.loads((REPO / "workflows" / "img2img.json").read_text())
    doc["title"] = title
    for node in doc["nodes"].values():
        inputs = node["inputs"]
        if node["type"] in ("CheckpointLoaderSimple", "CheckpointLoader"):
            inputs["ckpt_name"] = TINY_CKPT
        if node["type"] == "ImageResize":
            inputs["width"] = inputs["height"] = 64
        if node["type"] == "KSampler":
            inputs.update(steps=3, sampler_name="euler", scheduler="normal")
        if node["type"] == "AddNoise":
            inputs["strength"] = strength
    return doc


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Ask a child process to end (SIGTERM), and kill it if it has not within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_json(base: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def job_finished(url: str, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Kiln's record of a job (``/api/jobs/<id>``) once it is no longer queued or running (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        job = json.loads(urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=10).read())
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def open_comfy_frontend(browser: Any, url: str, node_type: str) -> tuple[Any, list[str]]:
    """A page on ComfyUI's own frontend (``kiln serve --frontend comfyui``) once it has registered
    ``node_type`` from /object_info, its templates panel closed; and the list its console errors go to."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/")
    page.wait_for_function(f"() => window.app?.graph && window.LiteGraph?.registered_node_types?.[{node_type!r}]",
                           timeout=60000)
    page.keyboard.press("Escape")  # the templates panel a fresh server opens
    return page, errors


class Server:
    """Kiln's server on a free loopback port, with a data folder, a models folder and a workflow library.

    By default it is the server's app (``make_app``, what ``kiln serve`` builds) served from a thread of
    the test process: a ``kiln serve`` process would first spend seconds of CPU importing the
    libraries this process already holds, on the path of the test that waits for it.
    ``process=True`` starts ``kiln serve`` itself, for a test of what the command does (its log, its
    options); tests/test_server_*.py cover the command's own behaviour.

    ``workflows``: files for its library (None: the tiny img2img pair the editor tests use;
    ``{}``: none). ``frontend``: ``comfyui`` serves ComfyUI's own frontend at ``/``.
    Once listening it imports the model libraries, as ``kiln serve`` does by default; ``warm_up=False``
    for a module that runs no model job (``--no-warm-up``)."""

    def __init__(self, root: Path, models: Path, workflows: dict[str, str] | None = None,
                 frontend: str = "kiln", warm_up: bool = True, process: bool = False) -> None:
        self.root, self.data, self.workflows = root, root / "data", root / "workflows"
        (self.data / "input").mkdir(parents=True)
        self.workflows.mkdir()
        gradient = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
        gradient.save(self.data / "input" / "sample.png")
        (self.data / "input" / "broken.png").write_bytes(b"not a png at all")  # fails only when loaded
        if workflows is None:
            workflows = {"img2img.json": json.dumps(tiny_img2img(), indent=1),
                         "strong.json": json.dumps(tiny_img2img("Strong repaint", 0.9), indent=1)}
        for name, text in workflows.items():
            (self.workflows / name).write_text(text)
        self.proc: subprocess.Popen | None = None
        self.thread: ThreadedApp | None = None
        if process:
            self.port = free_port()
            self._start_process(models, frontend, warm_up)
        else:
            from engine.server.app import make_app, start_warm_up
            from engine.server.state import ServerSettings

            app = make_app(self.data, models, self.workflows, settings=ServerSettings(frontend=frontend))
            self.thread = ThreadedApp(app)
            self.port = self.thread.port
            if warm_up:
                start_warm_up(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start_process(self, models: Path, frontend: str, warm_up: bool) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
        log = self.root / "server.log"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data", str(self.data), "--models", str(models), "--workflows", str(self.workflows),
                 "--frontend", frontend, *([] if warm_up else ["--no-warm-up"])],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/api/nodes", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kiln serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self.thread is not None:
            self.thread.stop()


class ThreadedApp:
    """An aiohttp app served on 127.0.0.1 (``port``: one the system picked as it bound, so no other
    process can take it in between) by an event loop of its own in a daemon thread, started before
    the constructor returns; ``stop`` runs the app's shutdown and cleanup (the server's worker ends,
    its store closes) and ends the thread."""

    def __init__(self, app: Any, timeout: float = 60) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, access_log=None)
        self.timeout = timeout
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()

        async def start() -> int:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", 0).start()
            return self.runner.addresses[0][1]
        try:
            self.port: int = self._call(start())
        except BaseException:
            self.stop()
            raise

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        try:
            self._call(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(self.timeout)
            if not self.thread.is_alive():
                self.loop.close()


# -- the editor page ----------------------------------------------------------------------------

class Editor:
    """A page with the editor open, and the mouse moves the tests share."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.console_errors: list[str] = []
        #: patterns of console errors a test provokes on purpose (each must then occur)
        self.expected_errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        page.on("requestfailed", self._on_failed)

    def _on_console(self, m: Any) -> None:
        if m.type == "error":
            where = m.location.get("url", "") if isinstance(m.location, dict) else ""
            self.console_errors.append(f"{m.text} [{where}]" if where else m.text)

    def _on_failed(self, request: Any) -> None:
        # A failed request names its URL here; the console message alone often does not.
        # An aborted one (an image replaced before it loaded, the page closing) is no error.
        if not request.url.startswith("data:") and "ERR_ABORTED" not in str(request.failure):
            self.console_errors.append(f"request failed: {request.url} ({request.failure})")

    def unexpected_errors(self) -> list[str]:
        """Console errors, page errors and failed requests that no test asked for."""
        return [e for e in self.console_errors if not any(re.search(p, e) for p in self.expected_errors)]

    def close_checked(self) -> None:
        """Close the page, then fail if it logged an error no test expected (every test, not only those that ask)."""
        errors = self.unexpected_errors()
        missing = [p for p in self.expected_errors if not any(re.search(p, e) for e in self.console_errors)]
        self.page.close()
        assert errors == [], errors
        assert missing == [], f"errors the test expected did not occur: {missing}"

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def doc(self) -> dict[str, Any]:
        return self.page.evaluate("window.kiln.toKiln()")

    def drawn(self) -> None:
        """Wait until what the document now says is drawn: the editor redraws links (and their reroute
        handles) on the next animation frame, so the document may be ahead of the SVG for one frame."""
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def socket(self, node_id: str, kind: str, key: Any) -> tuple[float, float]:
        pos = self.page.evaluate("([id, kind, key]) => window.kiln.socketPos(id, kind, key)", [node_id, kind, key])
        assert pos, f"no {kind} socket {key!r} on node {node_id}"
        return pos[0], pos[1]

    def drag(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        m = self.page.mouse
        m.move(*start)
        m.down()
        m.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=4)
        m.move(*end, steps=4)
        m.up()

    def link(self, src: str, output: int, dst: str, input_name: str) -> None:
        self.drag(self.socket(src, "out", output), self.socket(dst, "in", input_name))

    def node(self, node_id: str) -> Any:
        return self.page.locator(f'.node[data-id="{node_id}"]')

    def canvas_point(self, x: float, y: float) -> tuple[float, float]:
        box = self.page.locator("#canvas").bounding_box()
        return box["x"] + x, box["y"] + y

    def add_node(self, query: str, x: float, y: float) -> str:
        """Double-click the canvas at (x, y), search, press Enter; returns the new node's id."""
        before = set(self.doc()["nodes"])
        self.page.mouse.dblclick(*self.canvas_point(x, y))
        self.page.locator(".palette-input").fill(query)
        self.page.keyboard.press("Enter")
        added = set(self.doc()["nodes"]) - before
        assert len(added) == 1, f"searching {query!r} added {added}"
        return added.pop()

    def wait_output_image(self, node_id: str) -> None:
        self.page.wait_for_function(
            """id => { const img = document.querySelector(`.node[data-id="${id}"] .node-media img.output`);
                       return img && img.complete && img.naturalWidth > 0; }""",
            arg=node_id, timeout=RUN_TIMEOUT_MS)

    def wait_idle(self) -> None:
        self.page.wait_for_function("!document.body.classList.contains('busy')", timeout=RUN_TIMEOUT_MS)


def open_editor(browser: Any, server: Server, viewport: dict[str, int] | None = None, **context: Any) -> Editor:
    """A new page (its own browser context, so its own localStorage) with the editor ready.

    The page bypasses the editor's Content-Security-Policy: Playwright's wait_for_function
    compiles its predicate with ``new Function``, which the policy forbids
    (tests/test_editor_csp.py checks the editor under its policy)."""
    page = browser.new_page(viewport=viewport or VIEWPORT, **({"bypass_csp": True} | context))
    ed = Editor(page)
    page.goto(server.url + "/")
    page.wait_for_function("document.body.classList.contains('ready')", timeout=20_000)
    return ed


def drop_file(editor: Editor, data: bytes, name: str, mime: str, at: tuple[float, float] | None = None) -> None:
    """Drop a file as the browser would after a drag from the desktop (at client coordinates)."""
    x, y = at or editor.canvas_point(500, 600)
    editor.page.evaluate(
        """([b64, name, mime, x, y]) => {
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             const dt = new DataTransfer();
             dt.items.add(new File([bytes], name, { type: mime }));
             const target = document.elementFromPoint(x, y);
             for (const type of ['dragover', 'drop'])
               target.dispatchEvent(new DragEvent(type, { dataTransfer: dt, clientX: x, clientY: y, bubbles: true, cancelable: true }));
           }""", [base64.b64encode(data).decode(), name, mime, x, y])
