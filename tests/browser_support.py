"""Shared helpers for the editor's browser tests: Debian's Chromium driven by Playwright.

The browser is launched from ``/usr/bin/chromium`` (never a downloaded one). CI
installs it (``make browser``), so a missing Chromium fails the tests with the
command that installs it rather than skipping them.
"""
from __future__ import annotations

import mimetypes
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

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
