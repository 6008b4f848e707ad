"""Errors that do not leak: no absolute server paths, tracebacks only in the log (or with --debug), small lists."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from engine import types as T
from engine.node import Input, Output, define_node
from engine.server.state import ServerSettings
from server_helpers import make_registry, wait_status


@define_node("LeakyFail", category="test", inputs=[Input("size", T.INT, default=10, min=1, max=10_000_000)],
             outputs=[Output("value", T.FLOAT)])
def leaky_fail(ctx, size):
    """Fails like a careless library does: the absolute path in the message, a long text, a deep stack."""
    where = ctx.env.paths.input.root / "cat.png"

    def dig(n: int) -> None:
        if n:
            dig(n - 1)
        raise OSError(f"[Errno 5] cannot read '{where}': " + "x" * size)

    dig(200)


def workflow(size: int = 10) -> dict[str, Any]:
    return {"version": 1, "nodes": {"1": {"type": "LeakyFail", "inputs": {"size": size}},
                                    "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
                                    "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}


async def start(aiohttp_client: Any, tmp_path: Path, **settings: Any) -> Any:
    from engine.server.app import make_app

    registry = make_registry()
    registry.add(leaky_fail)
    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=registry,
                   settings=ServerSettings(**settings))
    return await aiohttp_client(app)


async def test_a_failed_job_names_files_by_folder_and_keeps_its_traceback_in_the_log(aiohttp_client, tmp_path,
                                                                                     caplog: pytest.LogCaptureFixture):
    client = await start(aiohttp_client, tmp_path)
    with caplog.at_level(logging.ERROR, logger="engine.server.worker"):
        job_id = (await (await client.post("/api/jobs", json={"workflow": workflow()})).json())["job_id"]
        job = await wait_status(client, job_id)
    assert job["status"] == "failed"
    root = str((tmp_path / "data").resolve())
    assert "cannot read 'input/cat.png'" in job["error"]["message"]
    assert job["error"]["traceback"] == []
    for path in (f"/api/jobs/{job_id}", "/api/jobs", f"/history/{job_id}", "/api/history"):
        text = await (await client.get(path)).text()
        assert root not in text, path
    # the whole traceback, server paths included, is in the server log
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback" in logged and "in dig" in logged and root in logged


async def test_a_job_that_keeps_going_names_files_by_folder_in_every_failure_and_logs_each_once(
        aiohttp_client, tmp_path, caplog: pytest.LogCaptureFixture):
    """keep_going: the node_failed event and the failures list go through the same redaction as the
    job's error, and the traceback reaches the log once, not again with the job's end."""
    client = await start(aiohttp_client, tmp_path)
    events: list[dict] = []
    ws = await client.ws_connect("/ws?clientId=leaks&protocol=kiln")
    with caplog.at_level(logging.ERROR, logger="engine.server.worker"):
        r = await client.post("/api/jobs", json={"workflow": workflow(), "keep_going": True, "client_id": "leaks"})
        job = await wait_status(client, (await r.json())["job_id"])
        while not any(e.get("type") == "job_failed" for e in events):
            msg = await ws.receive_json(timeout=10)
            if isinstance(msg, dict) and msg.get("type") in ("node_failed", "job_failed"):
                events.append(msg)
    await ws.close()
    root = str((tmp_path / "data").resolve())
    assert job["status"] == "failed" and job["error"]["blocked"] == ["2", "3"]
    assert "cannot read 'input/cat.png'" in job["error"]["failures"][0]["message"] and root not in str(job["error"])
    node_failed = [e for e in events if e["type"] == "node_failed"]
    assert len(node_failed) == 1 and root not in str(node_failed) and node_failed[0]["traceback"] == []
    logged = [r.getMessage() for r in caplog.records if "Traceback" in r.getMessage()]
    assert len(logged) == 1 and root in logged[0]


async def test_debug_keeps_a_bounded_traceback_and_lists_stay_small(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path, traceback_chars=4000)
    ids = [(await (await client.post("/api/jobs", json={"workflow": workflow(2_000_000), "force": True})).json())
           ["job_id"] for _ in range(3)]
    for job_id in ids:
        await wait_status(client, job_id)
    job = await (await client.get(f"/api/jobs/{ids[0]}")).json()
    trace = "".join(job["error"]["traceback"])
    assert "in dig" in trace, trace[:3000]
    assert len(trace) <= 4000 + 200 and "shortened" in trace, len(trace)
    assert len(job["error"]["message"]) > 2_000_000  # the job's own route has the whole message
    listing = await (await client.get("/api/jobs")).text()
    assert len(listing) < 20_000, len(listing)
    assert "GET /api/jobs/{id} has all of it" in listing and "Traceback" not in listing
