"""``kiln serve`` imports the model libraries once it listens (Worker.warm_up), on the lane that runs jobs.

A real server on loopback with the stub registry and a real SQLite queue; the warm-up is a
function the test holds, so what must not have happened yet cannot have (no timings).
"""
from __future__ import annotations

import asyncio
import logging
import threading

from server_helpers import kiln, show_workflow, wait_status  # noqa: F401

from engine.server.state import STATE


async def test_a_job_sent_while_the_lane_warms_up_waits_for_it_then_runs_on_that_lane(kiln):
    entered, release = threading.Event(), threading.Event()
    ran_on: list[str] = []

    def imports() -> None:
        ran_on.append(threading.current_thread().name)
        entered.set()
        release.wait(10)

    kiln.server.app[STATE].worker.warm_up(imports)
    assert await asyncio.to_thread(entered.wait, 10)
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(3)})
    assert r.status == 201, await r.text()  # answered while the lane is busy: stored by a pool thread
    job_id = (await r.json())["job_id"]
    assert (await (await kiln.get(f"/api/jobs/{job_id}")).json())["status"] == "queued"
    release.set()
    assert (await wait_status(kiln, job_id))["status"] == "succeeded"
    assert ran_on == ["kiln-worker-0"]


async def test_a_failing_warm_up_is_logged_and_the_lane_goes_on(kiln, caplog):
    called = threading.Event()

    def imports() -> None:
        called.set()
        raise RuntimeError("a broken model library")

    caplog.set_level(logging.ERROR, logger="engine.server.worker")
    kiln.server.app[STATE].worker.warm_up(imports)
    assert await asyncio.to_thread(called.wait, 10)
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(4)})
    assert (await wait_status(kiln, (await r.json())["job_id"]))["status"] == "succeeded"
    for _ in range(100):  # logged just after the call returned, on the lane
        if "warming up failed" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "warming up failed" in caplog.text and "a broken model library" in caplog.text
