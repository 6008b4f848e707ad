"""One lane per device in one process: `kiln serve --devices cpu,cpu` runs two jobs at once,
each lane with its own model host and cache (checked with a real tiny checkpoint)."""
from __future__ import annotations

import threading
from typing import Any

import tiny_models as tiny
from cluster_helpers import make_registry
from server_helpers import wait_status

from engine import types as T
from engine.cli import _devices
from engine.node import Input, Result, define_node
from engine.server.app import make_app
from engine.server.state import STATE

#: Both jobs must be inside the node at the same time for either to pass it.
_BARRIER: dict[str, threading.Barrier] = {}


@define_node("Rendezvous", category="test", output_node=True,
             inputs=[Input("model", T.MODEL), Input("tag", T.STRING, default="")])
def rendezvous(ctx, model, tag):
    """Waits until the other job is here too (fails after 30 s alone); reports its lane's host and device."""
    _BARRIER["b"].wait(timeout=30)
    return Result(ui={"text": [f"{id(ctx.models)} {ctx.device} {model.name}"]})


def _workflow(tag: str) -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "1": {"type": "CheckpointLoader", "inputs": {"ckpt_name": tiny.checkpoint_name("sd1")}},
        "2": {"type": "Rendezvous", "inputs": {"model": ["1", 0], "tag": tag}}}}


async def test_two_cpu_lanes_run_two_jobs_at_once_each_with_its_own_models(aiohttp_client, tmp_path,
                                                                             tiny_models_dir):
    registry = make_registry()
    registry.add(rendezvous)
    _BARRIER["b"] = threading.Barrier(2)
    app = make_app(tmp_path / "data", tiny_models_dir, tmp_path / "wf", registry=registry,
                   devices=_devices("cpu,cpu"))
    client = await aiohttp_client(app)
    worker = app[STATE].worker
    hosts = worker.model_hosts()
    assert worker.devices() == ["cpu", "cpu"] and len(hosts) == 2 and hosts[0] is not hosts[1]

    ids = []
    for tag in ("a", "b"):
        r = await client.post("/api/jobs", json={"workflow": _workflow(tag)})
        assert r.status == 201, await r.text()
        ids.append((await r.json())["job_id"])
    jobs = [await wait_status(client, job_id, timeout=60) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], [j["error"] for j in jobs]

    reported = {j["outputs"]["2"]["text"][0] for j in jobs}
    assert {int(r.split()[0]) for r in reported} == {id(h) for h in hosts}  # one job on each lane
    assert all(r.split()[1] == "cpu" for r in reported)
    for host in hosts:  # each lane loaded the checkpoint into its own host: no handle crossed lanes
        stats = host.stats()
        assert stats["loaded"] == 1 and stats["entries"][0]["path"].endswith(tiny.checkpoint_name("sd1"))

    stats = await worker.cache_stats()
    assert stats["entries"] >= 4  # loader and rendezvous, cached in each lane
    cleared = await (await client.post("/api/cache/clear")).json()
    assert cleared["cleared"] == stats["entries"] and cleared["cache"]["entries"] == 0
    freed = await (await client.post("/api/models/free")).json()
    assert freed["unloaded"] == 2 and all(h.stats()["loaded"] == 0 for h in hosts)
    system = await (await client.get("/system_stats")).json()
    assert [d["name"] for d in system["devices"]] == ["cpu", "cpu"]

    # The two loads took turns: accelerate's process-wide "empty weights" patch is not left behind.
    import torch

    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_devices_option_parsing():
    assert _devices(None) is None and _devices("") is None
    assert _devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
