"""Submissions handed to an idle worker lane (engine.server.handoff), and the lane's held loop calls.

Real servers on loopback with a real SQLite queue; the hand-over pieces with a
real event loop and real threads. No timings are asserted: where something must
not have happened yet, the test holds the thread that would make it happen.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
from server_helpers import kiln, make_registry, show_workflow, slow_workflow, wait_status  # noqa: F401

from engine import types as T
from engine.cache import OutputCache
from engine.context import Environment, Paths
from engine.node import Input, Result, define_node
from engine.server.handoff import Handed, Inbox, run_submission
from engine.server.loop_calls import LoopCalls
from engine.server.state import STATE
from engine.server.store import JobStore
from engine.server.worker import Worker


def test_a_handed_submission_runs_once_whoever_takes_it_first():
    runs: list[int] = []
    inbox = Inbox()
    item = Handed(lambda: runs.append(1) or "stored")
    inbox.put(item)
    assert item.take()  # the pool's fallback got there first
    item.run()
    assert inbox.run_waiting() == 0  # the lane finds it taken and leaves it
    assert runs == [1] and item.future.result() == "stored"


def test_a_failing_submission_settles_its_request_and_spares_the_lane():
    inbox = Inbox()
    bad = Handed(lambda: 1 / 0)
    good = Handed(lambda: "next")
    inbox.put(bad)
    inbox.put(good)
    assert inbox.run_waiting() == 2  # nothing raised on the lane
    assert isinstance(bad.future.exception(), ZeroDivisionError)
    assert good.future.result() == "next"


async def test_a_submission_handed_to_a_lane_that_got_busy_runs_on_a_pool_thread(tmp_path):
    # The lane looked idle but never comes back for it (its thread is not started here).
    worker = Worker(JobStore(tmp_path / "jobs.sqlite"), make_registry(), Environment(paths=Paths.under(tmp_path / "data")),
                    cache=OutputCache(0))
    worker.lanes[0].idle = True
    ran_on: list[str] = []
    result = await run_submission(worker.offer, lambda: ran_on.append(threading.current_thread().name) or 7)
    assert result == 7
    assert ran_on and not ran_on[0].startswith("kiln-worker")
    assert worker._inbox.run_waiting() == 0


async def test_held_calls_reach_the_loop_at_the_flush_in_order():
    calls = LoopCalls()
    calls.attach(asyncio.get_running_loop())
    got: list[int] = []
    queued, go, done = threading.Event(), threading.Event(), threading.Event()

    def lane() -> None:
        calls.hold()
        for i in range(3):
            calls.call(got.append, i)
        queued.set()
        go.wait(10)
        calls.flush()
        done.set()

    thread = threading.Thread(target=lane)
    thread.start()
    await asyncio.to_thread(queued.wait, 10)
    for _ in range(5):
        await asyncio.sleep(0)
    assert got == []  # held: no wake-up was scheduled
    go.set()
    await asyncio.to_thread(done.wait, 10)
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.01)
    thread.join(10)
    assert got == [0, 1, 2]


async def test_an_idle_server_stores_submissions_on_its_lane_and_answers_errors_by_node(kiln):
    worker = kiln.server.app[STATE].worker
    ws = await kiln.ws_connect("/ws?clientId=h&protocol=kiln")
    await ws.receive_json()  # the status greeting
    before = worker.stored_on_lanes
    ids = []
    for _ in range(3):  # the first runs, the others are identical: every node cached
        r = await kiln.post("/api/jobs", json={"workflow": show_workflow(5), "client_id": "h"})
        assert r.status == 201, await r.text()
        ids.append((await r.json())["job_id"])
        seen = []
        while not seen or seen[-1]["type"] != "job_finished":
            event = await ws.receive_json()
            if event.get("job_id") == ids[-1]:
                seen.append(event)
        assert [e["type"] for e in seen][0] == "job_started"
    assert worker.stored_on_lanes > before  # at least one (a lane can be mid-poll) went by a lane
    for job_id in ids:
        assert (await wait_status(kiln, job_id))["status"] == "succeeded"
    bad = show_workflow(5)
    bad["nodes"]["1"]["inputs"]["value"] = "not a number"
    r = await kiln.post("/api/jobs", json={"workflow": bad})
    assert r.status == 400
    body = await r.text()
    assert "'1'" in body or '"1"' in body
    assert "value" in body
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(6)})
    assert r.status == 201  # the lane survived the bad one
    assert (await wait_status(kiln, (await r.json())["job_id"]))["status"] == "succeeded"
    await ws.close()


async def test_a_submission_while_the_lane_runs_a_job_is_answered_before_that_job_ends(kiln):
    blocker = (await (await kiln.post("/api/jobs", json={"workflow": slow_workflow(1, ticks=2000,
                                                                                     delay=0.01)})).json())["job_id"]
    await wait_status(kiln, blocker, ("running",))
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(3)})
    assert r.status == 201
    queued = (await r.json())["job_id"]
    assert (await (await kiln.get(f"/api/jobs/{blocker}")).json())["status"] == "running"
    assert (await (await kiln.get(f"/api/jobs/{queued}")).json())["status"] == "queued"
    await kiln.post(f"/api/jobs/{blocker}/cancel")
    assert (await wait_status(kiln, queued))["status"] == "succeeded"


# -- what a lane skips when it stores a submission itself --------------------------------------

#: tag -> how many times the Checked node's validate hook ran for it (the environment checks).
CHECKS: dict[str, int] = {}


def _count_check(env, literals):
    CHECKS[literals["tag"]] = CHECKS.get(literals["tag"], 0) + 1
    return []


@define_node("Checked", category="test", output_node=True, inputs=[Input("tag", T.STRING)], validate=_count_check)
def _checked(ctx, tag):
    return Result(ui={"text": [tag]})


@pytest.fixture
async def kiln_checked(aiohttp_client, tmp_path, monkeypatch):
    """A real server whose registry has the Checked node; a handed submission never falls back to a
    pool thread (so which thread stored it does not depend on how busy the machine is)."""
    from engine.server import handoff
    from engine.server.app import make_app

    monkeypatch.setattr(handoff, "FALLBACK_S", 30.0)
    registry = make_registry()
    registry.add(_checked)
    return await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows",
                                         registry=registry))


def _checked_workflow(tag: str) -> dict:
    return {"version": 1, "nodes": {"1": {"type": "Checked", "inputs": {"tag": tag}}}}


async def test_a_job_the_lane_stored_itself_runs_on_that_validation_but_a_queued_one_is_checked_again(
        kiln_checked):
    kiln = kiln_checked
    worker = kiln.server.app[STATE].worker
    before = worker.stored_on_lanes
    r = await kiln.post("/api/jobs", json={"workflow": _checked_workflow("idle")})
    assert r.status == 201
    assert (await wait_status(kiln, (await r.json())["job_id"]))["status"] == "succeeded"
    assert worker.stored_on_lanes == before + 1
    assert CHECKS["idle"] == 1  # validated when stored; claimed on the same turn, nothing re-checked

    blocker = (await (await kiln.post("/api/jobs", json={"workflow": slow_workflow(1, ticks=2000,
                                                                                     delay=0.01)})).json())["job_id"]
    await wait_status(kiln, blocker, ("running",))
    r = await kiln.post("/api/jobs", json={"workflow": _checked_workflow("queued")})
    assert r.status == 201
    queued = (await r.json())["job_id"]
    assert CHECKS["queued"] == 1
    await kiln.post(f"/api/jobs/{blocker}/cancel")
    assert (await wait_status(kiln, queued))["status"] == "succeeded"
    assert CHECKS["queued"] == 2  # it waited in the queue: its files and settings were checked again


async def test_a_submission_sent_on_hearing_of_a_finish_is_stored_on_the_lane_and_the_queue_count_goes_out(
        kiln_checked):
    kiln = kiln_checked
    worker = kiln.server.app[STATE].worker
    ws = await kiln.ws_connect("/ws?clientId=r&protocol=kiln")
    await ws.receive_json(timeout=10)  # the status greeting
    before = worker.stored_on_lanes
    for _ in range(5):  # identical: from the second on every node is cached
        r = await kiln.post("/api/jobs", json={"workflow": _checked_workflow("again"), "client_id": "r"})
        assert r.status == 201
        job_id = (await r.json())["job_id"]
        finished = emptied = False
        while not (finished and emptied):  # the job's end, and the count the lane sent after it
            event = await ws.receive_json(timeout=10)
            finished = finished or (event["type"] == "job_finished" and event["job_id"] == job_id)
            emptied = emptied or (event["type"] == "status" and event["queue_remaining"] == 0)
    # The lane was idle each time the next submission arrived (it marks itself idle before the end leaves).
    assert worker.stored_on_lanes == before + 5
    await ws.close()
