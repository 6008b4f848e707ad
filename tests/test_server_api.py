"""Kiln's /api routes and ComfyUI's HTTP routes on a real server (stub nodes, real SQLite)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from engine.server.app import make_app
from engine.server.state import STATE, ServerSettings
from server_helpers import kiln, make_registry, show_workflow, wait_status  # noqa: F401  (fixture)

BROKEN = {"version": 1, "nodes": {
    "1": {"type": "Number", "inputs": {"value": 5000}},                    # over the maximum
    "2": {"type": "Format", "inputs": {"value": ["9", 0]}},                # link to a missing node
    "3": {"type": "Join", "inputs": {"a": "x", "sep": "+"}},                # not a choice
    "4": {"type": "Show", "inputs": {}},                                    # required input missing
    "5": {"type": "NoSuchNode", "inputs": {}},                              # unknown type
    "6": {"type": "Format", "inputs": {"value": ["1", 0]}},                # (each above feeds an output)
    "7": {"type": "Show", "inputs": {"text": ["6", 0]}},
    "8": {"type": "Show", "inputs": {"text": ["2", 0]}},
    "10": {"type": "Show", "inputs": {"text": ["3", 0]}},
}}


async def test_submit_run_and_read_a_job(kiln):
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(2.5)})
    assert r.status == 201
    job_id = (await r.json())["job_id"]
    job = await wait_status(kiln, job_id)
    assert job["status"] == "succeeded"
    assert job["outputs"] == {"3": {"text": ["2.5"]}}
    assert job["error"] is None and job["progress"] is None
    assert job["created"] <= job["started"] <= job["finished"]
    assert job["executed"] == ["1", "2", "3"]


async def test_named_params_and_comfy_api_format(kiln):
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(), "params": {"value": "7"}})
    assert r.status == 201
    job = await wait_status(kiln, (await r.json())["job_id"])
    assert job["outputs"]["3"]["text"] == ["7"] and job["params"] == {"value": 7.0}
    api = {"1": {"class_type": "Number", "inputs": {"value": 3}},
           "3": {"class_type": "Show", "inputs": {"text": ["2", 0]}},
           "2": {"class_type": "Format", "inputs": {"value": ["1", 0]}}}
    r = await kiln.post("/api/jobs", json={"workflow": api, "params": {"1.value": 4}})
    job = await wait_status(kiln, (await r.json())["job_id"])
    assert job["outputs"]["3"]["text"] == ["4"]


async def test_force_reruns_and_cache_serves_repeat(kiln):
    first = await wait_status(kiln, (await (await kiln.post("/api/jobs", json={"workflow": show_workflow(9)})).json())["job_id"])
    again = await wait_status(kiln, (await (await kiln.post("/api/jobs", json={"workflow": show_workflow(9)})).json())["job_id"])
    forced = await wait_status(kiln, (await (await kiln.post(
        "/api/jobs", json={"workflow": show_workflow(9), "force": True})).json())["job_id"])
    assert first["executed"] == ["1", "2", "3"]
    assert again["executed"] == [] and again["cached"] == ["3"]  # upstream not needed
    assert again["outputs"] == first["outputs"]
    assert forced["executed"] == ["1", "2", "3"]
    r = await kiln.post("/api/cache/clear")
    assert (await r.json())["cleared"] == 3
    after = await wait_status(kiln, (await (await kiln.post("/api/jobs", json={"workflow": show_workflow(9)})).json())["job_id"])
    assert after["executed"] == ["1", "2", "3"]


async def test_validation_errors_are_400_with_every_error(kiln):
    r = await kiln.post("/api/jobs", json={"workflow": BROKEN, "params": {"nope": 1}})
    assert r.status == 400
    body = await r.json()
    kinds = {(e["node_id"], e["input_name"], e["type"]) for e in body["errors"]}
    assert (None, None, "unknown_parameter") in kinds
    assert ("1", "value", "value_bigger_than_max") in kinds
    assert ("2", "value", "bad_linked_input") in kinds
    assert ("3", "sep", "value_not_in_list") in kinds
    assert ("4", "text", "required_input_missing") in kinds
    assert ("5", None, "unknown_node_type") in kinds
    assert "6 problem(s)" in body["error"]["message"]
    jobs = await (await kiln.get("/api/jobs")).json()
    assert jobs["total"] == 0  # nothing was queued


async def test_a_spare_broken_node_is_reported_and_the_rest_runs(kiln):
    """A node no output needs never runs, so its problem does not refuse the job (ComfyUI's rule): /api/jobs
    names it in the reply, /prompt answers as ComfyUI does, and both jobs run what the outputs need."""
    doc = show_workflow(2.5)
    doc["nodes"]["9"] = {"type": "Join", "inputs": {"a": "x", "sep": "+"}}
    r = await kiln.post("/api/jobs", json={"workflow": doc})
    assert r.status == 201
    body = await r.json()
    assert [(e["node_id"], e["input_name"], e["type"]) for e in body["ignored"]] == [("9", "sep", "value_not_in_list")]
    job = await wait_status(kiln, body["job_id"])
    assert job["status"] == "succeeded" and job["outputs"] == {"3": {"text": ["2.5"]}}
    assert "9" not in job["executed"]
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 4}},
              "2": {"class_type": "Format", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"text": ["2", 0]}},
              "9": {"class_type": "Add", "inputs": {"b": 1}}}
    r = await kiln.post("/prompt", json={"prompt": prompt})
    assert r.status == 200 and (await r.json())["node_errors"] == {}
    job = await wait_status(kiln, (await r.json())["prompt_id"])
    assert job["outputs"] == {"3": {"text": ["4"]}}


async def test_comfy_prompt_400_shape(kiln):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 5000}},
              "2": {"class_type": "Format", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"text": ["2", 0]}},
              "4": {"class_type": "Join", "inputs": {"a": "x", "sep": "+"}},
              "5": {"class_type": "Show", "inputs": {"text": ["4", 0]}}}
    r = await kiln.post("/prompt", json={"prompt": prompt, "client_id": "c1"})
    assert r.status == 400
    body = await r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    e1 = body["node_errors"]["1"]
    assert e1["class_type"] == "Number" and e1["dependent_outputs"] == ["3"]
    assert e1["errors"][0]["type"] == "value_bigger_than_max"
    assert e1["errors"][0]["extra_info"]["input_name"] == "value"
    assert body["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    # unknown node: ComfyUI's invalid_prompt; no output node: prompt_no_outputs; no prompt: no_prompt
    r = await kiln.post("/api/prompt", json={"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_prompt"
    r = await kiln.post("/prompt", json={"prompt": {"1": {"class_type": "Number", "inputs": {}}}})
    assert (await r.json())["error"]["type"] == "prompt_no_outputs"
    r = await kiln.post("/prompt", json={"client_id": "x"})
    assert r.status == 400 and (await r.json())["error"]["type"] == "no_prompt"


async def test_comfy_prompt_queue_history_shapes(kiln):
    prompt = show_workflow(6)["nodes"]
    prompt = {k: {"class_type": v["type"], "inputs": v["inputs"]} for k, v in prompt.items()}
    r = await kiln.post("/prompt", json={"prompt": prompt, "client_id": "c1", "prompt_id": "my-id",
                                         "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}},
                                                        "api_key_comfy_org": "secret"}})
    assert r.status == 200
    body = await r.json()
    assert body == {"prompt_id": "my-id", "number": body["number"], "node_errors": {}}
    await wait_status(kiln, "my-id")
    hist = await (await kiln.get("/history/my-id")).json()
    entry = hist["my-id"]
    number, pid, stored_prompt, extra, outputs = entry["prompt"]
    assert pid == "my-id" and stored_prompt["1"]["class_type"] == "Number" and outputs == ["3"]
    assert extra["client_id"] == "c1" and "api_key_comfy_org" not in extra
    assert entry["outputs"] == {"3": {"text": ["6"]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert await (await kiln.get("/history/unknown")).json() == {}
    # a duplicate prompt_id is refused
    r = await kiln.post("/prompt", json={"prompt": prompt, "prompt_id": "my-id"})
    assert r.status == 400
    assert await (await kiln.get("/prompt")).json() == {"exec_info": {"queue_remaining": 0}}
    assert await (await kiln.get("/api/queue")).json() == {"queue_running": [], "queue_pending": []}
    # POST /history delete removes it
    await kiln.post("/history", json={"delete": ["my-id"]})
    assert await (await kiln.get("/api/history/my-id")).json() == {}


async def test_history_paging_both_shapes(kiln):
    ids = []
    for i in range(5):
        r = await kiln.post("/api/jobs", json={"workflow": show_workflow(i)})
        ids.append((await r.json())["job_id"])
    for job_id in ids:
        await wait_status(kiln, job_id)
    page = await (await kiln.get("/api/history?limit=2&offset=1")).json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 1
    assert [j["id"] for j in page["jobs"]] == [ids[3], ids[2]]  # newest first
    comfy = await (await kiln.get("/history?max_items=2")).json()
    assert list(comfy) == [ids[3], ids[4]]  # ComfyUI: the last N, oldest first
    comfy_api = await (await kiln.get("/api/history?max_items=3&offset=0")).json()
    assert list(comfy_api) == ids[:3]
    everything = await (await kiln.get("/history")).json()
    assert list(everything) == ids
    r = await kiln.get("/api/history?limit=zero")
    assert r.status == 400
    listed = await (await kiln.get("/api/jobs?status=succeeded&limit=3")).json()
    assert listed["total"] == 5 and len(listed["jobs"]) == 3
    assert (await kiln.get("/api/jobs?status=bogus")).status == 400


async def test_unknown_job_is_404_json(kiln):
    for method, path in (("GET", "/api/jobs/nope"), ("POST", "/api/jobs/nope/cancel")):
        r = await kiln.request(method, path)
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found"
    r = await kiln.get("/api/no/such/route")
    assert r.status == 404 and (await r.json())["error"]["type"] == "not_found"


async def test_malformed_and_oversize_bodies_refused_server_keeps_serving(kiln):
    r = await kiln.post("/api/jobs", data=b'{"workflow": {', headers={"Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_json"
    r = await kiln.post("/prompt", data=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = await kiln.post("/api/jobs", json=[1, 2])
    assert r.status == 400
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(), "bogus": 1})
    assert r.status == 400 and "bogus" in (await r.json())["error"]["message"]
    big = b'{"workflow": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    for path in ("/api/jobs", "/prompt"):
        r = await kiln.post(path, data=big, headers={"Content-Type": "application/json"})
        assert r.status == 413, path

    async def chunks():  # no Content-Length: refused while streaming
        for _ in range(10):
            yield b"x" * (1024 * 1024)
    r = await kiln.post("/api/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status == 413
    r = await kiln.post("/api/jobs", json={"workflow": show_workflow(1)})
    assert r.status == 201
    assert (await wait_status(kiln, (await r.json())["job_id"]))["status"] == "succeeded"


async def test_node_info_models_system(kiln):
    state = kiln.server.app[STATE]
    nodes = await (await kiln.get("/api/nodes")).json()
    assert nodes["Number"]["inputs"][0]["name"] == "value"
    info = await (await kiln.get("/object_info")).json()
    assert info["Join"]["input"]["required"]["sep"][0] == [" ", "-", ","]
    one = await (await kiln.get("/api/object_info/Show")).json()
    assert list(one) == ["Show"] and one["Show"]["output_node"] is True
    assert await (await kiln.get("/object_info/Nope")).json() == {}
    ckpts = Path(state.env.paths.models.root) / "checkpoints"
    ckpts.mkdir()
    (ckpts / "b.safetensors").write_bytes(b"0")
    (ckpts / "a.ckpt").write_bytes(b"0")
    (ckpts / "notes.txt").write_text("not a model")
    (ckpts / "tiny").mkdir()
    (ckpts / "tiny" / "model_index.json").write_text("{}")
    (ckpts / "tiny" / "unet.safetensors").write_bytes(b"0")
    assert await (await kiln.get("/api/models/checkpoints")).json() == ["a.ckpt", "b.safetensors", "tiny"]
    assert await (await kiln.get("/models/checkpoints")).json() == ["a.ckpt", "b.safetensors", "tiny"]
    assert (await kiln.get("/api/models/nothing")).status == 404
    assert (await kiln.get("/api/models/..%2F..")).status in (400, 403, 404)
    assert "checkpoints" in await (await kiln.get("/api/models")).json()
    stats = await (await kiln.get("/system_stats")).json()
    assert {"system", "devices"} <= set(stats) and stats["devices"][0]["type"] == "cpu"
    assert isinstance(await (await kiln.get("/api/embeddings")).json(), list)
    assert await (await kiln.get("/extensions")).json() == []
    r = await kiln.post("/api/models/free")
    assert r.status == 200 and "freed" in await r.json()


async def test_editor_static_files(tmp_path):
    web_dir = tmp_path / "web"
    (web_dir / "js").mkdir(parents=True)
    (web_dir / "index.html").write_text("<!doctype html><title>Kiln</title>")
    (web_dir / "js" / "app.js").write_text("export const x = 1;")
    (tmp_path / "secret.txt").write_text("no")
    app = make_app(tmp_path / "data", registry=make_registry(), settings=ServerSettings(web_dir=web_dir))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        r = await client.get("/")
        assert r.status == 200 and r.content_type == "text/html" and "Kiln" in await r.text()
        r = await client.get("/web/js/app.js")
        assert r.status == 200 and r.content_type == "text/javascript"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert (await client.get("/web/js/missing.js")).status == 404
        for bad in ("/web/..%2Fsecret.txt", "/web/%2E%2E/secret.txt", "/web/js/..%2F..%2Fsecret.txt"):
            r = await client.get(bad)
            assert r.status in (403, 404), bad
            assert "no" != (await r.text()).strip()


async def test_the_real_node_library_serves_schemas(aiohttp_client, tmp_path):
    """make_app without a registry uses the installed nodes (entry points), not the stubs."""
    client = await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf"))
    info = await (await client.get("/object_info")).json()
    assert "LoadImage" in info and "SaveImage" in info
    assert "Number" not in info
    body = json.loads(await (await client.get("/api/nodes")).text())
    assert body["SaveImage"]["output_node"] is True
    await asyncio.sleep(0)


async def test_outputs_selects_which_output_nodes_run(kiln):
    wf = show_workflow(3)
    wf["nodes"]["4"] = {"type": "Join", "inputs": {"a": "x", "b": "y"}}
    wf["nodes"]["5"] = {"type": "Show", "inputs": {"text": ["4", 0]}}
    r = await kiln.post("/api/jobs", json={"workflow": wf, "outputs": ["5"]})
    job = await wait_status(kiln, (await r.json())["job_id"])
    assert job["outputs"] == {"5": {"text": ["x y"]}} and job["executed"] == ["4", "5"]
    r = await kiln.post("/api/jobs", json={"workflow": wf, "outputs": ["42"]})
    assert r.status == 400 and (await r.json())["errors"][0]["type"] == "unknown_output_target"
    r = await kiln.post("/api/jobs", json={"workflow": wf, "outputs": "5"})
    assert r.status == 400


async def test_job_list_pages_across_active_and_finished(kiln):
    ids = []
    for i in range(4):
        ids.append((await (await kiln.post("/api/jobs", json={"workflow": show_workflow(i)})).json())["job_id"])
    for job_id in ids:
        await wait_status(kiln, job_id)
    page1 = await (await kiln.get("/api/jobs?limit=3")).json()
    page2 = await (await kiln.get("/api/jobs?limit=3&offset=3")).json()
    assert page1["total"] == page2["total"] == 4
    assert [j["id"] for j in page1["jobs"] + page2["jobs"]] == ids[::-1]
    assert "workflow" not in page1["jobs"][0]


async def test_free_routes_unload_models_and_clear_the_cache(kiln):
    """/api/models/free and ComfyUI's /free really drop loaded models (not just move them off the GPU)."""
    import torch

    state = kiln.server.app[STATE]
    manager = state.env.models

    def load(name: str) -> None:
        manager.acquire(("test", name), lambda m: {"net": torch.nn.Linear(4, 4)})

    load("a")
    assert manager.stats()["loaded"] == 1
    r = await kiln.post("/api/models/free")
    body = await r.json()
    assert r.status == 200 and body["freed"] is True and body["unloaded"] == 1
    assert body["models"]["loaded"] == 0 and manager.stats()["loaded"] == 0

    load("b")
    assert (await kiln.post("/free", json={})).status == 200  # nothing asked: nothing dropped
    assert manager.stats()["loaded"] == 1
    assert (await kiln.post("/free", json={"unload_models": True})).status == 200
    assert manager.stats()["loaded"] == 0

    load("c")
    await wait_status(kiln, (await (await kiln.post("/api/jobs", json={"workflow": show_workflow(8)})).json())["job_id"])
    assert (await state.worker.cache_stats())["entries"] > 0
    assert (await kiln.post("/api/free", json={"free_memory": True})).status == 200
    assert manager.stats()["loaded"] == 0 and (await state.worker.cache_stats())["entries"] == 0
