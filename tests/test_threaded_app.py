"""The browser tests' in-process server (browser_support.ThreadedApp): it serves on a port the system
picked, its stop runs the app's cleanup and ends its thread, and a start that fails leaves no thread."""
from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from aiohttp import web

from browser_support import ThreadedApp


def _app(events: list[str]) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {threading.current_thread().name}")

    async def cleanup(app: web.Application) -> None:
        events.append("cleanup")

    app = web.Application()
    app.router.add_get("/", hello)
    app.on_cleanup.append(cleanup)
    return app


def test_it_serves_from_its_own_thread_until_stopped():
    events: list[str] = []
    served = ThreadedApp(_app(events))
    try:
        assert served.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/", timeout=10) as r:
            assert r.read().decode() == "hello from test-server"
    finally:
        served.stop()
    assert events == ["cleanup"] and not served.thread.is_alive() and served.loop.is_closed()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{served.port}/", timeout=5)
    served.stop()  # a second stop is a no-op


def test_a_failed_start_raises_and_leaves_no_thread():
    async def refuse(app: web.Application) -> None:
        raise RuntimeError("the store is damaged")

    app = _app([])
    app.on_startup.append(refuse)
    before = {t for t in threading.enumerate() if t.name == "test-server"}
    with pytest.raises(RuntimeError, match="the store is damaged"):
        ThreadedApp(app)
    assert {t for t in threading.enumerate() if t.name == "test-server"} == before
