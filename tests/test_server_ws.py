"""The websocket: ComfyUI's messages and binary previews, Kiln's typed events (JSON and msgpack),
routing by client id, progress throttling, and the ComfyUI client flow end to end."""
from __future__ import annotations

import asyncio
import io
import json
import struct
import time
from typing import Any

import aiohttp
import msgpack
import pytest
from PIL import Image

from engine.events import Preview, Progress
from engine.server.app import make_app
from engine.server.state import STATE, ServerSettings
from server_helpers import kiln, wait_status  # noqa: F401  (fixture)


def spin_workflow(ticks: int = 50, preview: bool = False, value: float = 1.0) -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "1": {"type": "Spin", "inputs": {"value": value, "ticks": ticks, "preview": preview}},
        "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
        "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}


def api_spin(ticks: int, value: float) -> dict[str, Any]:
    """The same graph in ComfyUI's API format, with previews produced at every tick."""
    return {"1": {"class_type": "Spin", "inputs": {"value": value, "ticks": ticks, "preview": True}},
            "2": {"class_type": "Format", "inputs": {"value": ["1", 0]}},
            "3": {"class_type": "Show", "inputs": {"text": ["2", 0]}}}


async def comfy_messages_until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str,
                                    timeout: float = 30) -> tuple[list[dict], list[bytes]]:
    """Read as a ComfyUI client does: until ``executing`` with node null for our prompt."""
    texts, binaries = [], []
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if msg.type == aiohttp.WSMsgType.BINARY:
            binaries.append(msg.data)
            continue
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        texts.append(data)
        if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == prompt_id:
            return texts, binaries


async def drain(ws: aiohttp.ClientWebSocketResponse, quiet: float = 0.1) -> list[dict]:
    """Every JSON message already sent, read until the socket is quiet for ``quiet`` seconds."""
    seen = []
    while True:
        try:
            seen.append(await ws.receive_json(timeout=quiet))
        except asyncio.TimeoutError:
            return seen


async def test_comfy_messages_in_order_and_routed_to_the_submitter(kiln):
    mine = await kiln.ws_connect("/ws?clientId=alice")
    other = await kiln.ws_connect("/ws?clientId=bob")
    hello = await mine.receive_json()
    assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "alice"}}
    await other.receive_json()
    r = await kiln.post("/prompt", json={"prompt": {k: {"class_type": v["type"], "inputs": v["inputs"]}
                                                    for k, v in spin_workflow(5)["nodes"].items()},
                                         "client_id": "alice"})
    pid = (await r.json())["prompt_id"]
    texts, _ = await comfy_messages_until_done(mine, pid)
    kinds = [m["type"] for m in texts if m["type"] != "status"]
    assert kinds[:2] == ["execution_start", "execution_cached"]
    assert kinds[-2:] == ["execution_success", "executing"]
    assert [m["data"]["node"] for m in texts if m["type"] == "executing"] == ["1", "2", "3", None]
    progress = [m["data"] for m in texts if m["type"] == "progress"]
    assert progress and progress[-1] == {"value": 5, "max": 5, "prompt_id": pid, "node": "1"}
    executed = [m["data"] for m in texts if m["type"] == "executed"]
    assert executed == [{"node": "3", "display_node": "3", "output": {"text": ["1"]}, "prompt_id": pid}]
    assert all(m["data"].get("prompt_id") == pid for m in texts if m["type"] != "status")
    # bob saw queue status only, never alice's job
    await asyncio.sleep(0.2)
    seen = await drain(other)
    assert seen and {m["type"] for m in seen} == {"status"}
    assert seen[-1]["data"]["status"]["exec_info"]["queue_remaining"] == 0
    await mine.close()
    await other.close()


async def test_execution_error_message(kiln):
    ws = await kiln.ws_connect("/ws?clientId=c")
    await ws.receive_json()
    wf = {"1": {"class_type": "Number", "inputs": {"value": 2}}, "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
          "3": {"class_type": "Format", "inputs": {"value": ["2", 0]}}, "4": {"class_type": "Show", "inputs": {"text": ["3", 0]}}}
    pid = (await (await kiln.post("/prompt", json={"prompt": wf, "client_id": "c"})).json())["prompt_id"]
    texts, _ = await comfy_messages_until_done(ws, pid)
    err = next(m["data"] for m in texts if m["type"] == "execution_error")
    assert err["node_id"] == "2" and err["node_type"] == "Fail" and err["exception_message"] == "refusing 2.0"
    assert err["exception_type"] == "NodeError" and err["executed"] == ["1"] and err["traceback"] == []
    # the store had the outcome before the client heard about it
    hist = await (await kiln.get(f"/history/{pid}")).json()
    assert hist[pid]["status"]["status_str"] == "error"
    await ws.close()


async def test_interrupt_message(kiln):
    ws = await kiln.ws_connect("/ws?clientId=c")
    await ws.receive_json()
    r = await kiln.post("/api/jobs", json={"workflow": {"version": 1, "nodes": {
        "1": {"type": "Spin", "inputs": {"value": 1, "ticks": 5000, "delay": 0.005}},
        "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
        "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}, "client_id": "c"})
    job_id = (await r.json())["job_id"]
    await wait_status(kiln, job_id, ("running",))
    await kiln.post("/interrupt")
    texts, _ = await comfy_messages_until_done(ws, job_id)
    stop = next(m["data"] for m in texts if m["type"] == "execution_interrupted")
    assert stop["node_id"] == "1" and stop["node_type"] == "Spin" and stop["prompt_id"] == job_id
    await ws.close()


async def test_fast_progress_is_throttled_but_last_and_all_others_arrive(kiln):
    kiln.server.app[STATE].settings.progress_per_second = 10
    ws = await kiln.ws_connect("/ws?clientId=slow")
    await ws.receive_json()
    t0 = time.monotonic()  # before the submission: a lane may run the job before its reply arrives
    r = await kiln.post("/api/jobs", json={"workflow": spin_workflow(20000), "client_id": "slow"})
    job_id = (await r.json())["job_id"]
    texts, _ = await comfy_messages_until_done(ws, job_id)
    elapsed = time.monotonic() - t0
    progress = [m["data"]["value"] for m in texts if m["type"] == "progress"]
    print(f"progress messages: {len(progress)} in {elapsed:.2f}s")
    assert progress[-1] == 20000  # the last one always arrives
    assert progress == sorted(progress)
    assert len(progress) <= 2 + elapsed * 10 * 1.5, (len(progress), elapsed)  # not 20000
    assert [m["type"] for m in texts].count("executed") == 1
    assert [m["type"] for m in texts].count("execution_success") == 1
    await ws.close()


async def test_comfy_binary_preview_frame(kiln):
    ws = await kiln.ws_connect("/ws?clientId=p")
    await ws.receive_json()
    job_id = (await (await kiln.post("/api/jobs", json={"workflow": spin_workflow(3, preview=True),
                                                        "client_id": "p",
                                                        "extra_data": {"preview_method": "auto"}})).json())["job_id"]
    texts, binaries = await comfy_messages_until_done(ws, job_id)
    assert binaries
    event_type, image_type = struct.unpack(">II", binaries[-1][:8])
    assert (event_type, image_type) == (1, 1)  # PREVIEW_IMAGE, JPEG
    assert Image.open(io.BytesIO(binaries[-1][8:])).size == (8, 8)
    await ws.close()


async def test_no_preview_frames_unless_the_job_or_the_server_asks(kiln):
    """ComfyUI's rule: --preview-method defaults to none; a job may override it, "default" defers."""
    ws = await kiln.ws_connect("/ws?clientId=np")
    kiln_ws = await kiln.ws_connect("/ws?clientId=np&protocol=kiln")
    await ws.receive_json()
    await kiln_ws.receive_json()
    for i, extra in enumerate(({}, {"preview_method": "default"}, {"preview_method": "none"})):
        body = {"prompt": api_spin(3, value=float(i)), "client_id": "np", "extra_data": extra}
        job_id = (await (await kiln.post("/prompt", json=body)).json())["prompt_id"]
        texts, binaries = await comfy_messages_until_done(ws, job_id)
        assert [m for m in texts if m["type"] == "progress"], "progress still arrives"
        assert binaries == [], extra
        events = []
        while not events or events[-1].get("type") != "job_finished":
            events.append(await kiln_ws.receive_json(timeout=10))
        assert all(e.get("preview") is None for e in events if e.get("type") == "progress"), extra
    # the server-wide setting (kiln serve --preview-method auto) turns them on for every job
    kiln.server.app[STATE].settings.preview_method = "auto"
    job_id = (await (await kiln.post("/prompt", json={"prompt": api_spin(3, value=9.0),
                                                      "client_id": "np"})).json())["prompt_id"]
    texts, binaries = await comfy_messages_until_done(ws, job_id)
    assert binaries and struct.unpack(">I", binaries[0][:4])[0] == 1
    # ... and a job can still refuse them
    job_id = (await (await kiln.post("/prompt", json={"prompt": api_spin(3, value=10.0), "client_id": "np",
                                                      "extra_data": {"preview_method": "none"}})).json())["prompt_id"]
    texts, binaries = await comfy_messages_until_done(ws, job_id)
    assert binaries == []
    await ws.close()
    await kiln_ws.close()


@pytest.mark.parametrize("route", ["/prompt", "/api/jobs"])
async def test_no_message_about_a_job_before_its_reply(aiohttp_client, tmp_path, route):
    """A fully cached job ends within milliseconds, on the worker thread, while its reply is
    still being written. Writing a reply is slowed here (0.3 s before its headers go out):
    every message about the job must still arrive after the reply, never before."""
    async def slow_reply(request, response):
        if request.method == "POST" and request.path == route:
            await asyncio.sleep(0.3)

    from server_helpers import make_registry

    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=make_registry())
    app.on_response_prepare.append(slow_reply)
    kiln = await aiohttp_client(app)
    ws = await kiln.ws_connect("/ws?clientId=order")
    await ws.receive_json()
    body = ({"prompt": api_spin(2, value=5.0), "client_id": "order"} if route == "/prompt"
            else {"workflow": api_spin(2, value=5.0), "client_id": "order"})
    for attempt in range(3):  # the first run computes, the next two are served from the cache
        order: list[str] = []

        async def read_ws() -> None:
            while True:
                data = await ws.receive_json(timeout=10)
                if data["type"] != "status":
                    order.append(f"ws:{data['type']}")
                if data["type"] == "executing" and data["data"]["node"] is None:
                    return

        reader = asyncio.create_task(read_ws())
        r = await kiln.post(route, json=body)
        order.append("reply")
        assert r.status in (200, 201), await r.text()
        await reader
        assert order[0] == "reply", (attempt, order)
        assert "ws:execution_success" in order
    await ws.close()


async def test_hub_holds_a_jobs_events_until_released():
    """The hub's side of the rule: events of a held job are kept in order, then delivered."""
    from engine.events import JobFinished, JobStarted
    from engine.server.hub import Hub

    hub = Hub()
    got: list[str] = []

    class Sink:
        client_id = "c"

        def put(self, item):
            got.append(item.event.type)

    hub._clients["c"] = {Sink()}
    hub.hold("j")
    hub.publish("c", JobStarted("j"))
    hub.publish("c", Progress("j", node_id="1", value=1, max=1,
                              preview=Preview(b"x", "image/jpeg", 1, 1)), previews=False)
    hub.publish("c", JobStarted("other"))  # another job is not held
    assert got == ["job_started"]
    hub.release("j")
    hub.publish("c", JobFinished("j"))
    assert got == ["job_started", "job_started", "progress", "job_finished"]
    hub.release("j")  # releasing twice is harmless


async def test_progress_is_coalesced_per_job():
    """A socket watching several jobs at once (a cross-job batch) keeps each job's latest step:
    coalescing never drops one job's progress (and preview) for another's."""
    from engine.server.hub import KILN, Client, Outgoing

    class Socket:  # the sending side of a websocket: records frames
        closed = False

        def __init__(self) -> None:
            self.frames: list[Any] = []

        async def send_str(self, text: str) -> None:
            self.frames.append(json.loads(text))

        async def send_bytes(self, data: bytes) -> None:
            self.frames.append(data)

    sock = Socket()
    client = Client(sock, "c", protocol=KILN, rate=1000.0)
    for step in (1, 2):
        for job in ("a", "b", "c"):
            client.put(Outgoing(Progress(job, node_id="3", value=step, max=2)))
    task = asyncio.get_running_loop().create_task(client.run())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(sock.frames) >= 3:
            break
    client.close()
    await task
    assert [(f["job_id"], f["value"]) for f in sock.frames] == [("a", 2), ("b", 2), ("c", 2)]


async def test_kiln_protocol_json_and_msgpack(kiln):
    js = await kiln.ws_connect("/ws?clientId=k&protocol=kiln")
    mp = await kiln.ws_connect("/ws?clientId=k&protocol=kiln&encoding=msgpack")
    assert (await js.receive_json())["type"] == "status"
    first = await mp.receive()
    assert first.type == aiohttp.WSMsgType.BINARY and msgpack.unpackb(first.data)["sid"] == "k"
    job_id = (await (await kiln.post("/api/jobs", json={"workflow": spin_workflow(3, preview=True),
                                                        "client_id": "k",
                                                        "extra_data": {"preview_method": "latent2rgb"}})).json())["job_id"]

    async def collect(ws, decode):
        out = []
        while True:
            msg = await ws.receive(timeout=10)
            item = decode(msg)
            if item is None:
                continue
            out.append(item)
            if item["type"] in ("job_finished", "job_failed", "job_interrupted"):
                return out

    def from_json(msg):
        return json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else None

    def from_msgpack(msg):
        assert msg.type == aiohttp.WSMsgType.BINARY
        return msgpack.unpackb(msg.data, raw=False)

    events = await collect(js, from_json)
    packed = await collect(mp, from_msgpack)
    for stream in (events, packed):
        kinds = [e["type"] for e in stream if e["type"] != "status"]
        assert kinds[:2] == ["job_started", "nodes_cached"]
        assert kinds[-1] == "job_finished" and "node_started" in kinds and "node_finished" in kinds
        assert all(e["job_id"] == job_id for e in stream if e["type"] != "status")
        done = stream[-1]
        assert done["outputs"] == {"3": {"text": ["1"]}}
    last_progress = [e for e in packed if e["type"] == "progress"][-1]
    assert last_progress["value"] == 3
    data = last_progress["preview"]["data"]
    assert isinstance(data, bytes) and data[:2] == b"\xff\xd8"  # raw JPEG bytes, not base64
    assert "data" not in [e for e in events if e["type"] == "progress"][-1]["preview"]
    await js.close()
    await mp.close()


async def test_jobs_without_client_id_broadcast_only_progress(kiln):
    ws = await kiln.ws_connect("/ws?clientId=watcher")
    await ws.receive_json()
    job_id = (await (await kiln.post("/api/jobs", json={"workflow": spin_workflow(3)})).json())["job_id"]
    await wait_status(kiln, job_id)
    await asyncio.sleep(0.3)
    seen = await drain(ws)
    assert {m["type"] for m in seen} <= {"status", "progress"}
    assert any(m["type"] == "progress" for m in seen)
    await ws.close()


async def test_a_vanished_client_does_not_hold_up_the_worker(kiln):
    ws = await kiln.ws_connect("/ws?clientId=gone")
    await ws.receive_json()
    await ws.close()
    ids = [(await (await kiln.post("/api/jobs", json={"workflow": spin_workflow(200, value=i),
                                                      "client_id": "gone"})).json())["job_id"] for i in range(3)]
    for job_id in ids:
        assert (await wait_status(kiln, job_id))["status"] == "succeeded"
    assert len(kiln.server.app[STATE].hub) == 0


# -- the ComfyUI client flow with the real node library -------------------------------------------

@pytest.fixture
async def real(aiohttp_client, tmp_path):
    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows",
                   settings=ServerSettings(max_upload_bytes=5 * 1024 * 1024))
    return await aiohttp_client(app)


async def _comfy_flow(client, prompt: dict[str, Any], upload_field: tuple[str, str]) -> tuple[dict, bytes]:
    """Upload, post the prompt, follow the socket, read history, fetch the first image via /view."""
    ws = await client.ws_connect("/ws?clientId=comfy-client")
    await ws.receive_json()
    src = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(src, "PNG")
    form = aiohttp.FormData()
    form.add_field("image", src.getvalue(), filename="init.png", content_type="image/png")
    form.add_field("overwrite", "true")
    r = await client.post("/upload/image", data=form)
    assert r.status == 200, await r.text()
    uploaded = await r.json()
    assert uploaded["type"] == "input"
    node_id, field = upload_field
    prompt[node_id]["inputs"][field] = uploaded["name"]
    r = await client.post("/prompt", json={"prompt": prompt, "client_id": "comfy-client"})
    assert r.status == 200, await r.text()
    pid = (await r.json())["prompt_id"]
    texts, _ = await comfy_messages_until_done(ws, pid, timeout=120)
    assert any(m["type"] == "execution_success" for m in texts), texts
    history = (await (await client.get(f"/history/{pid}")).json())[pid]
    images = [img for out in history["outputs"].values() for img in out.get("images", [])]
    assert images and images[0]["type"] == "output"
    r = await client.get("/view", params={"filename": images[0]["filename"], "subfolder": images[0]["subfolder"],
                                          "type": "output"})
    assert r.status == 200 and r.content_type == "image/png"
    await ws.close()
    return history, await r.read()


async def test_comfy_client_flow_upload_prompt_ws_history_view(real):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": ""}},
              "2": {"class_type": "ImageResize", "inputs": {"image": ["1", 0], "width": 32, "height": 32,
                                                            "mode": "stretch"}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "flow"}}}
    history, png = await _comfy_flow(real, prompt, ("1", "image"))
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (32, 32)
        assert abs(im.convert("RGB").getpixel((5, 5))[2] - 200) <= 2
        assert json.loads(im.text["prompt"])["2"]["class_type"] == "ImageResize"


async def test_comfy_client_img2img_flow_with_the_tiny_model(real, request):
    """The same flow on a real img2img graph; needs the tiny model fixtures and the diffusion nodes."""
    import tiny_models as tiny

    models = real.server.app[STATE].env.paths.models.root
    ckpt_name = tiny.checkpoint_name("sd1")
    tiny.save_single_file("sd1", models / "checkpoints" / ckpt_name)
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": ""}},
        "11": {"class_type": "ImageResize", "inputs": {"image": ["10", 0], "width": 64, "height": 64}},
        "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 0.6, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["12", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "img2img"}},
    }
    history, png = await _comfy_flow(real, prompt, ("10", "image"))
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (64, 64)
    assert [m[0] for m in history["status"]["messages"]][-1] == "execution_success"


async def test_save_image_default_prefix_follows_the_workflows_format(real):
    """A ComfyUI-format workflow without filename_prefix saves as ComfyUI would (ComfyUI_00001_.png);
    the same graph in Kiln's format keeps Kiln's default; ComfyUI's /object_info shows ComfyUI's."""
    src = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src, "PNG")
    form = aiohttp.FormData()
    form.add_field("image", src.getvalue(), filename="p.png", content_type="image/png")
    assert (await real.post("/upload/image", data=form)).status == 200
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "p.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    kiln_doc = {"version": 1, "nodes": {"1": {"type": "LoadImage", "inputs": {"image": "p.png"}},
                                        "2": {"type": "SaveImage", "inputs": {"images": ["1", 0]}}}}
    names = {}
    for label, body in (("comfy", {"workflow": api}), ("kiln", {"workflow": kiln_doc, "force": True})):
        job_id = (await (await real.post("/api/jobs", json=body)).json())["job_id"]
        job = await wait_status(real, job_id)
        assert job["status"] == "succeeded", job
        names[label] = job["outputs"]["2"]["images"][0]["filename"]
    assert names == {"comfy": "ComfyUI_00001_.png", "kiln": "Kiln_00001_.png"}
    info = await (await real.get("/object_info/SaveImage")).json()
    assert info["SaveImage"]["input"]["required"]["filename_prefix"][1]["default"] == "ComfyUI"
