"""Shared helpers for the editor's browser tests: Debian's Chromium driven by Playwright.

The browser is launched from ``/usr/bin/chromium`` (never a downloaded one). CI
installs it (``make browser``), so a missing Chromium fails the tests with the
command that installs it rather than skipping them.
"""
from __future__ import annotations

import json
import mimetypes
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from server_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}


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


class Server:
    def __init__(self, root: Path, models: Path, workflows: dict[str, str] | None = None) -> None:
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
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data", str(self.data), "--models", str(models), "--workflows", str(self.workflows)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
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
                raise RuntimeError(f"kiln serve did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
