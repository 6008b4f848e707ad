"""The Dask cluster backend on loopback: a real scheduler and two real `kiln worker` processes.

One cluster (scheduler, workers w1 and w2) serves the whole module; each test
builds its own `kiln serve --cluster` app on a fresh data folder. w1's models
folder has a checkpoint w2's lacks (only-w1.safetensors); the server's has one no
worker has (only-server.safetensors). Nothing here sleeps for a fixed time: every
wait is on a condition.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

import tiny_models as tiny
from cluster_helpers import Cluster, make_registry, wait_for
from server_helpers import free_port, kiln_command, save_workflow, slow_workflow, wait_status
from test_server_ws import comfy_messages_until_done, spin_workflow

from engine import __version__
from engine.server.app import make_app
from engine.server.state import STATE

pytestmark = pytest.mark.slow
CKPT = tiny.checkpoint_name("sd1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_models_dir):
    base = tmp_path_factory.mktemp("cluster")
    for folder, extra in (("models-w1", ["only-w1.safetensors"]), ("models-w2", []),
                          ("models-server", ["only-w1.safetensors", "only-server.safetensors"])):
        ckpts = base / folder / "checkpoints"
        ckpts.mkdir(parents=True)
        for name in [CKPT, *extra]:
            shutil.copyfile(tiny_models_dir / "checkpoints" / CKPT, ckpts / name)
    c = Cluster(base)
    try:
        c.start_scheduler()
        c.start_worker("w1", base / "models-w1")
        c.start_worker("w2", base / "models-w2")
        yield c
    finally:
        c.close()


def ensure_workers(cluster: Cluster) -> None:
    """Bring back a worker an earlier test killed, so every test starts with w1 and w2."""
    for name in ("w1", "w2"):
        if name not in cluster.workers:
            cluster.start_worker(name, cluster.base / f"models-{name}")


@pytest.fixture
async def server(aiohttp_client, cluster, tmp_path):
    ensure_workers(cluster)
    app = make_app(tmp_path / "data", cluster.base / "models-server", tmp_path / "wf", registry=make_registry(),
                   cluster=cluster.address)
    client = await aiohttp_client(app)
    worker = app[STATE].worker
    await wait_for(lambda: sorted(worker.devices()) == ["w1", "w2"], 90, "both workers to join")
    return client


async def submit(client: Any, workflow: dict, **extra: Any) -> str:
    r = await client.post("/api/jobs", json={"workflow": workflow, **extra})
    assert r.status == 201, await r.text()
    return (await r.json())["job_id"]


async def job(client: Any, job_id: str) -> dict:
    return await (await client.get(f"/api/jobs/{job_id}")).json()


async def running_with_progress(client: Any, job_id: str) -> dict:
    async def check() -> dict | None:
        j = await job(client, job_id)
        return j if j["status"] == "running" and j["progress"] and j["progress"]["value"] > 0 else None
    return await wait_for(check, 60, f"job {job_id} to report progress")


def img2img(seed: int, image: str) -> dict:
    return {"version": 1, "nodes": {
        "1": {"type": "CheckpointLoader", "inputs": {"ckpt_name": CKPT}},
        "2": {"type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"type": "LoadImage", "inputs": {"image": image}},
        "5": {"type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"type": "KSampler", "inputs": {"seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                             "scheduler": "normal", "denoise": 0.6, "model": ["1", 0],
                                             "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0]}},
        "7": {"type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "fox"}}}}


#: A loader job's targets: its text encoder (so the checkpoint loads) and the save; nothing else needs the loader.
LOADER_TARGETS = {"outputs": ["2", "3"]}


def loader_only(ckpt: str) -> dict:
    return {"version": 1, "nodes": {
        "1": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt}},
        "2": {"type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}},
        "3": {"type": "StubSaveText", "inputs": {"text": "loaded", "prefix": "ckpt"}}}}


# -- spread, cancel, files ------------------------------------------------------------------

async def test_jobs_spread_over_both_workers_and_cancel_reaches_them(server):
    a = await submit(server, slow_workflow(1, ticks=3000))
    b = await submit(server, slow_workflow(2, ticks=3000))
    ja, jb = await running_with_progress(server, a), await running_with_progress(server, b)
    assert {ja["worker"], jb["worker"]} == {"w1", "w2"}  # both at once, one on each worker

    t0 = time.monotonic()
    for job_id in (a, b):
        r = await server.post(f"/api/jobs/{job_id}/cancel")
        assert (await r.json())["interrupting"] is True
    for job_id in (a, b):
        done = await wait_status(server, job_id, timeout=20)
        assert done["status"] == "interrupted" and done["outputs"] == {}
    assert time.monotonic() - t0 < 15  # not the 30 s the jobs would run
    hist = await (await server.get(f"/history/{a}")).json()
    assert hist[a]["status"]["messages"][-1][0] == "execution_interrupted"

    # a file written on a worker comes back into the server's output folder and is served
    c = await submit(server, save_workflow("from the cluster"))
    done = await wait_status(server, c, timeout=30)
    assert done["status"] == "succeeded" and done["worker"] in ("w1", "w2")
    name = done["outputs"]["1"]["files"][0]["filename"]
    r = await server.get("/view", params={"filename": name, "type": "output"})
    assert r.status == 200 and await r.read() == b"from the cluster"

    # keep_going travels to the worker: the branch beside a failure saves its file
    doc = {"version": 1, "nodes": {**save_workflow("beside a failure")["nodes"],
                                   "2": {"type": "Number", "inputs": {"value": 3}},
                                   "3": {"type": "Fail", "inputs": {"value": ["2", 0]}},
                                   "4": {"type": "Format", "inputs": {"value": ["3", 0]}},
                                   "5": {"type": "Show", "inputs": {"text": ["4", 0]}}}}
    r = await server.post("/api/jobs", json={"workflow": doc, "keep_going": True})
    done = await wait_status(server, (await r.json())["job_id"], timeout=30)
    assert done["status"] == "failed" and done["error"]["blocked"] == ["4", "5"]
    assert [f["node_id"] for f in done["error"]["failures"]] == ["3"] and "1" in done["outputs"]


# -- routing by warmth, inputs travelling, images coming back ---------------------------------

async def _upload(client: Any) -> str:
    src = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(src, "PNG")
    form = aiohttp.FormData()
    form.add_field("image", src.getvalue(), filename="fox.png", content_type="image/png")
    r = await client.post("/upload/image", data=form)
    assert r.status == 200, await r.text()
    return (await r.json())["name"]


async def test_a_new_seed_lands_on_the_warm_worker(server):
    image = await _upload(server)  # exists only in the server's input folder: it travels with the job
    first = await wait_status(server, await submit(server, img2img(1, image)), timeout=400)
    assert first["status"] == "succeeded", first["error"]
    # Another seed: the idle-longest rule alone would pick the other (never used) worker.
    second = await wait_status(server, await submit(server, img2img(2, image)), timeout=400)
    assert second["status"] == "succeeded", second["error"]
    assert second["worker"] == first["worker"]
    # its VAE encoding and text encodings came from that worker's cache (LoadImage was not even needed)
    assert {"1", "2", "3", "5"} <= set(second["cached"]) and "6" in second["executed"]
    assert "4" not in second["executed"] and "5" not in second["executed"]

    names = [o["images"][0]["filename"] for o in (first["outputs"]["8"], second["outputs"]["8"])]
    assert names[0] != names[1]  # both images kept, neither overwritten
    for name in names:
        r = await server.get("/view", params={"filename": name, "type": "output"})
        assert r.status == 200
        with Image.open(io.BytesIO(await r.read())) as im:
            assert im.size == (64, 64) and json.loads(im.text["prompt"])["6"]["class_type"] == "KSampler"

    # the cache and model routes reach the workers
    cleared = await (await server.post("/api/cache/clear")).json()
    assert cleared["cleared"] >= 7 and cleared["cache"]["entries"] == 0
    freed = await (await server.post("/api/models/free")).json()
    assert freed["freed"] is True and freed["unloaded"] >= 1
    assert freed["models"][second["worker"]]["loaded"] == 0


# -- faults ---------------------------------------------------------------------------------

async def test_kill_9_of_a_worker_mid_job_loses_nothing_and_saves_nothing_twice(server, cluster):
    workflow = {"version": 1, "nodes": {
        "1": {"type": "StubSaveText", "inputs": {"text": "before", "prefix": "first"}},
        "2": {"type": "Spin", "inputs": {"value": 3.0, "ticks": 200, "delay": 0.01}},
        "3": {"type": "Format", "inputs": {"value": ["2", 0]}},
        "4": {"type": "StubSaveText", "inputs": {"text": ["3", 0], "prefix": "second"}}}}
    job_id = await submit(server, workflow)
    running = await running_with_progress(server, job_id)  # node 1 already saved its file
    victim = running["worker"]
    output = Path(server.server.app[STATE].env.paths.output.root)
    assert (output / f"first_{job_id}.txt").is_file()
    cluster.kill(victim)

    done = await wait_status(server, job_id, timeout=90)
    assert done["status"] == "succeeded", done["error"]
    assert done["worker"] not in (None, victim)
    assert sorted(p.name for p in output.iterdir()) == [f"first_{job_id}.txt", f"second_{job_id}.txt"]
    assert (output / f"second_{job_id}.txt").read_text() == "3"
    hist = (await (await server.get(f"/history/{job_id}")).json())[job_id]
    kinds = [m[0] for m in hist["status"]["messages"]]
    assert kinds.count("execution_start") == 1 and kinds[-1] == "execution_success"  # the final attempt's


async def test_a_job_that_kills_its_workers_ends_failed_with_the_reason(aiohttp_client, cluster, tmp_path):
    ensure_workers(cluster)
    app = make_app(tmp_path / "data", cluster.base / "models-server", tmp_path / "wf", registry=make_registry(),
                   cluster=cluster.address, max_attempts=2)
    client = await aiohttp_client(app)
    await wait_for(lambda: sorted(app[STATE].worker.devices()) == ["w1", "w2"], 90, "both workers to join")
    deadly = {"version": 1, "nodes": {"1": {"type": "Crash", "inputs": {"value": 1.0}},
                                      "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
                                      "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}
    done = await wait_status(client, await submit(client, deadly), timeout=90)
    assert done["status"] == "failed"
    assert "lost with 2 worker(s) that died while running it" in done["error"]["message"]
    for name in ("w1", "w2"):  # both really died (the fixture starts them again for the next test)
        assert cluster.workers[name].wait(30) == -9
        cluster.workers.pop(name)


async def test_a_checkpoint_a_worker_lacks_goes_to_one_that_has_it(server):
    busy = await submit(server, slow_workflow(1, ticks=3000))
    holder = (await running_with_progress(server, busy))["worker"]
    # Occupy w1 so the only idle worker (w2) lacks the checkpoint, unless w2 took the slow job.
    if holder != "w1":
        await server.post(f"/api/jobs/{busy}/cancel")
        await wait_status(server, busy, timeout=20)
        busy = await submit(server, slow_workflow(2, ticks=3000))
        holder = (await running_with_progress(server, busy))["worker"]
    needs_w1 = await submit(server, loader_only("only-w1.safetensors"), **LOADER_TARGETS)
    await wait_for(lambda: server.server.app[STATE].worker._jobs.get(needs_w1) is not None and
                   server.server.app[STATE].worker._jobs[needs_w1].excluded, 60, "w2 to refuse the job")
    await server.post(f"/api/jobs/{busy}/cancel")
    done = await wait_status(server, needs_w1, timeout=60)
    assert done["status"] == "succeeded" and done["worker"] == "w1", done["error"]

    lacked = await submit(server, loader_only("only-server.safetensors"), **LOADER_TARGETS)
    nobody = await wait_status(server, lacked, timeout=60)
    assert nobody["status"] == "failed"
    message = nobody["error"]["message"]
    assert "no worker can run this job" in message and "only-server.safetensors" in message
    assert "worker w1" in message and "worker w2" in message and nobody["error"]["node_id"] == "1"


async def test_a_worker_of_another_version_is_refused_naming_both(server, cluster):
    proc = cluster.start_worker("old", cluster.base / "models-w2", version="0.0.0-old")
    try:
        assert proc.wait(60) == 2
    finally:
        cluster.workers.pop("old", None)
    log = cluster.log("old")
    assert "Kiln 0.0.0-old" in log and f"Kiln {__version__}" in log


async def test_a_server_never_sends_jobs_to_a_worker_of_another_version(aiohttp_client, tmp_path):
    """The other order: the old worker joined before any server announced its version."""
    own = Cluster(tmp_path)
    try:
        own.start_scheduler()
        own.start_worker("old", tmp_path / "models", version="0.0.0-old")
        from distributed import Client

        async with Client(own.address, asynchronous=True) as dask:  # the old worker is in before the server
            async def joined() -> bool:
                info = await dask.scheduler.identity()
                return any(w.get("name") == "old" for w in info["workers"].values())
            await wait_for(joined, 90, "the old worker to join the scheduler")
        app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf", registry=make_registry(),
                       cluster=own.address)
        client = await aiohttp_client(app)
        worker = app[STATE].worker
        refused = await wait_for(lambda: worker.workers()["refused"], 90, "the old worker to be seen")
        [reason] = refused.values()
        assert "Kiln 0.0.0-old" in reason and f"Kiln {__version__}" in reason and worker.devices() == []
        job_id = await submit(client, save_workflow("for the right version"))
        assert (await job(client, job_id))["status"] == "queued"
        own.start_worker("new", tmp_path / "models")
        done = await wait_status(client, job_id, timeout=90)
        assert done["status"] == "succeeded" and done["worker"] == "new"
    finally:
        own.close()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_unreachable_scheduler_is_a_clear_error_not_a_hang(tmp_path, command):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    args = (["serve", "--cluster", address, "--cluster-timeout", "2", "--port", str(free_port()),
             "--data", str(tmp_path / "data")] if command == "serve" else
            ["worker", address, "--timeout", "2", "--data", str(tmp_path / "w")])
    done = subprocess.run([*kiln_command(), *args], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 2, done.stderr
    assert f"cannot reach the Dask scheduler at {address}" in done.stderr


async def test_a_lost_scheduler_keeps_the_queue_and_everyone_reconnects(aiohttp_client, tmp_path):
    """Its own scheduler (restarted on the same port) and worker, so the shared cluster is left alone."""
    own = Cluster(tmp_path)
    client = None
    try:
        port = int(own.start_scheduler().rsplit(":", 1)[1])
        own.start_worker("r1", tmp_path / "models")
        app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf", registry=make_registry(),
                       cluster=own.address, cluster_timeout=2)
        client = await aiohttp_client(app)
        worker = app[STATE].worker
        await wait_for(lambda: worker.devices() == ["r1"], 90, "the worker to join")
        first = await submit(client, slow_workflow(1, ticks=200, delay=0.01))
        await running_with_progress(client, first)

        own.stop_scheduler()
        await wait_for(lambda: worker.running() == [], 30, "the server to notice")
        assert (await job(client, first))["status"] == "queued"  # not lost, not failed: queued again
        second = await submit(client, save_workflow("after the outage"))
        assert (await job(client, second))["status"] == "queued"

        own.start_scheduler(port=port)
        for job_id in (first, second):
            done = await wait_status(client, job_id, timeout=90)
            assert done["status"] == "succeeded" and done["worker"] == "r1", done["error"]
        assert (await job(client, first))["outputs"]["3"]["text"] == ["1"]
    finally:
        if client is not None:  # the server first, while its scheduler still answers (closing its Dask
            await client.close()  # client against a stopped scheduler waits out the 2 s timeout)
        own.close()


# -- the websocket ----------------------------------------------------------------------------

def _normal(messages: list[dict], prompt_id: str) -> list[Any]:
    """The sequence a ComfyUI client acts on: ids and times replaced, progress ticks left out
    (they are coalesced by time on both backends; the last one is compared separately)."""
    out = []
    for m in messages:
        if m["type"] in ("status", "progress"):
            continue
        text = json.dumps(m).replace(prompt_id, "PID")
        data = json.loads(text)["data"]
        data.pop("timestamp", None)
        out.append([m["type"], data])
    return out


async def _comfy_run(client: Any) -> tuple[list[Any], dict]:
    ws = await client.ws_connect("/ws?clientId=cmp")
    await ws.receive_json()
    prompt = {k: {"class_type": v["type"], "inputs": v["inputs"]}
              for k, v in spin_workflow(5, preview=True)["nodes"].items()}
    # ComfyUI clients get previews only when they ask (extra_data.preview_method), on both backends
    r = await client.post("/prompt", json={"prompt": prompt, "client_id": "cmp", "extra_data": {"preview_method": "auto"}})
    pid = (await r.json())["prompt_id"]
    texts, binaries = await comfy_messages_until_done(ws, pid, timeout=60)
    await ws.close()
    progress = [m["data"] for m in texts if m["type"] == "progress"]
    assert binaries  # previews arrive as binary frames on both
    return _normal(texts, pid), {k: v for k, v in progress[-1].items() if k != "prompt_id"}


async def test_the_comfyui_websocket_sequence_matches_the_in_process_one(server, aiohttp_client, tmp_path):
    from server_helpers import make_registry as stub_registry

    local = await aiohttp_client(make_app(tmp_path / "local", tmp_path / "m", tmp_path / "w",
                                          registry=stub_registry()))
    expected, expected_last = await _comfy_run(local)
    seen, last = await _comfy_run(server)
    assert seen == expected and last == expected_last == {"value": 5, "max": 5, "node": "1"}


def test_the_safety_filter_is_refused_with_a_cluster(tmp_path):
    """The guard runs where nodes run; workers build none yet, so a filtering server must not start."""
    from engine.guard import GuardRefused

    with pytest.raises(GuardRefused, match="cluster"):
        make_app(tmp_path / "data", registry=make_registry(), cluster=f"tcp://127.0.0.1:{free_port()}",
                 safety=("blur", "checker"))
