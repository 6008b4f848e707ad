"""The worker runs the plan validated at submission, unless something it read may have changed.

Real servers on loopback with a real SQLite queue. ``Executor.validations`` counts
the worker's whole validations (the submission route validates without it), so a
job whose submitted plan was reused leaves it at 0.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from server_helpers import kiln, make_registry, show_workflow, slow_workflow, wait_status  # noqa: F401

from engine.context import Environment, Paths
from engine.executor import Executor
from engine.formats import parse_document
from engine.server.app import DB_NAME, make_app
from engine.server.state import STATE
from engine.server.store import JobStore
from engine.validate import still_valid
from nodes.image import load_image, preview_image


def _validations(client) -> int:
    return sum(lane.executor.validations for lane in client.server.app[STATE].worker.lanes)


async def _submit(client, workflow) -> str:
    r = await client.post("/api/jobs", json={"workflow": workflow})
    assert r.status == 201, await r.text()
    return (await r.json())["job_id"]


async def test_the_worker_runs_the_plan_validated_at_submission(kiln):
    # One job alone, then three queued behind a running one (the batching look-ahead plans those).
    first = await wait_status(kiln, await _submit(kiln, show_workflow(1)))
    assert first["status"] == "succeeded"
    blocker = await _submit(kiln, slow_workflow(1, ticks=200, delay=0.01))
    await wait_status(kiln, blocker, ("running",))
    queued = [await _submit(kiln, show_workflow(v)) for v in (2, 3, 4)]
    await kiln.post(f"/api/jobs/{blocker}/cancel")
    for job_id in queued:
        assert (await wait_status(kiln, job_id))["status"] == "succeeded"
    assert _validations(kiln) == 0
    # every plan handed over was dropped when its job finished
    assert all(kiln.server.app[STATE].store.handed_plan(j) is None for j in [first["id"], blocker, *queued])


def _load_workflow(name: str) -> dict:
    return {"version": 1, "nodes": {"1": {"type": "LoadImage", "inputs": {"image": name}},
                                    "2": {"type": "PreviewImage", "inputs": {"images": ["1", 0]}}}}


async def _image_server(aiohttp_client, tmp_path: Path):
    registry = make_registry()
    registry.add(load_image)
    registry.add(preview_image)
    return await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf", registry=registry))


async def test_an_input_file_deleted_while_queued_fails_naming_node_and_input(aiohttp_client, tmp_path):
    client = await _image_server(aiohttp_client, tmp_path)
    picture = tmp_path / "data" / "input" / "gone.png"
    Image.new("RGB", (8, 8)).save(picture)
    blocker = await _submit(client, slow_workflow(1, ticks=500, delay=0.01))
    await wait_status(client, blocker, ("running",))
    doomed = await _submit(client, _load_workflow("gone.png"))  # valid now: the file is there
    picture.unlink()
    await client.post(f"/api/jobs/{blocker}/cancel")
    job = await wait_status(client, doomed)
    assert job["status"] == "failed"
    error = job["error"]
    assert (error["node_id"], error["node_type"], error["input_name"]) == ("1", "LoadImage", "image")
    assert error["message"].startswith("the workflow is no longer valid") and "gone.png" in error["message"]
    assert _validations(client) == 1  # the re-check failed, so the whole workflow was validated again


async def test_a_job_restored_from_the_database_is_validated(aiohttp_client, tmp_path):
    # Queued by a previous process: only its row exists, no plan in memory.
    registry = make_registry()
    workflow = parse_document(show_workflow(7), registry)
    store = JobStore(tmp_path / "data" / DB_NAME)
    restored = store.add(workflow=workflow.to_kiln(), prompt=workflow.to_api(), outputs_to_execute=["3"]).id
    store.close()
    client = await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf",
                                           registry=registry))
    job = await wait_status(client, restored)
    assert job["status"] == "succeeded" and job["outputs"]["3"]["text"] == ["7"]
    assert _validations(client) == 1


def test_a_plan_is_reused_only_on_its_own_basis(tmp_path):
    """Another registry, other folders or a failing environment check: validate anew."""
    registry = make_registry()
    env = Environment(paths=Paths.under(tmp_path))
    plan = Executor(registry, env).plan(parse_document(show_workflow(1), registry))
    assert still_valid(plan, registry, env)
    assert not still_valid(plan, make_registry(), env)
    assert not still_valid(plan, registry, Environment(paths=Paths.under(tmp_path / "other")))
    assert not still_valid(plan, registry, None)


async def test_a_refused_duplicate_id_leaves_the_queued_jobs_plan(kiln):
    blocker = await _submit(kiln, slow_workflow(1, ticks=300, delay=0.01))
    await wait_status(kiln, blocker, ("running",))
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(5), "job_id": "same"})
    assert r.status == 201
    store = kiln.server.app[STATE].store
    handed = store.handed_plan("same")
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(6), "job_id": "same"})
    assert r.status == 400 and (await r.json())["errors"][0]["type"] == "duplicate_id"
    assert store.handed_plan("same") is handed
    await kiln.post(f"/api/jobs/{blocker}/cancel")
    job = await wait_status(kiln, "same")
    assert job["status"] == "succeeded" and job["outputs"]["3"]["text"] == ["5"]
    assert _validations(kiln) == 0
