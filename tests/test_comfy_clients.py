"""Real ComfyUI clients from the package registry against a real ``kiln serve`` on loopback.

* comfy-api-simplified gets the saved image (not a live preview it never asked for),
  and the file names it asked for on upload;
* comfy-script's client survives 20 identical (fully cached) resubmissions;
* a websocket client of our own, written to ComfyUI's documented protocol
  (``websockets``, not aiohttp, so the server is not checked against itself).

The server is the ``kiln`` command with the real node library and a tiny random
SD1 checkpoint, started once for the module.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from browser_support import Server

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import tiny_models as tiny

    base_dir = tmp_path_factory.mktemp("comfy-clients")
    models = base_dir / "models"
    ckpt = tiny.checkpoint_name("sd1")
    tiny.save_single_file("sd1", models / "checkpoints" / ckpt)
    srv = Server(base_dir / "kiln", models, workflows={})
    try:
        yield {"url": srv.url, "port": srv.port, "data": srv.data, "ckpt": ckpt, "dir": base_dir}
    finally:
        srv.stop()


def img2img_prompt(ckpt: str, image: str, seed: int = 1) -> dict[str, Any]:
    """ComfyUI's img2img graph (API format, with the editor's titles); no filename_prefix."""
    def node(cls: str, title: str, **inputs: Any) -> dict[str, Any]:
        return {"class_type": cls, "inputs": inputs, "_meta": {"title": title}}

    return {
        "4": node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=ckpt),
        "6": node("CLIPTextEncode", "Positive", text="a red fox", clip=["4", 1]),
        "7": node("CLIPTextEncode", "Negative", text="", clip=["4", 1]),
        "10": node("LoadImage", "Load Image", image=image),
        "12": node("VAEEncode", "VAE Encode", pixels=["10", 0], vae=["4", 2]),
        "3": node("KSampler", "KSampler", seed=seed, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                  denoise=0.7, model=["4", 0], positive=["6", 0], negative=["7", 0], latent_image=["12", 0]),
        "8": node("VAEDecode", "VAE Decode", samples=["3", 0], vae=["4", 2]),
        "9": node("SaveImage", "Save Image", images=["8", 0]),
    }


def png_file(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Path:
    Image.new("RGB", size, colour).save(path, "PNG")
    return path


def test_comfy_api_simplified_gets_the_image_and_its_upload_names(server: dict[str, Any], tmp_path: Path) -> None:
    from comfy_api_simplified import ComfyApiWrapper

    api = ComfyApiWrapper(server["url"])
    first = png_file(tmp_path / "first.png", (200, 40, 40))
    up = api.upload_image(first)  # into its "default_upload_folder" subfolder
    assert up == {"name": "first.png", "subfolder": "default_upload_folder", "type": "input"}
    # the same bytes under another name come back under that name, and that file exists
    twin = tmp_path / "twin.png"
    twin.write_bytes(first.read_bytes())
    assert api.upload_image(twin)["name"] == "twin.png"
    assert (server["data"] / "input" / "default_upload_folder" / "twin.png").read_bytes() == first.read_bytes()

    results = api.queue_and_wait_images(img2img_prompt(server["ckpt"], "default_upload_folder/twin.png"),
                                        "Save Image")
    assert len(results) == 1, list(results)
    (name, data), = results.items()
    # the saved file, fetched by name after the job (a preview frame would be keyed "0" and be a JPEG)
    assert name.startswith("ComfyUI_") and name.endswith("_.png"), name
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        assert json.loads(im.text["prompt"])["3"]["class_type"] == "KSampler"
    assert (server["data"] / "output" / name).read_bytes() == data


COMFY_SCRIPT = """
import sys, time
from comfy_script.runtime import load, Workflow
load(sys.argv[1])
from comfy_script.runtime.nodes import LoadImage, SaveImage
with open(sys.argv[2], 'w') as out:  # comfy-script prints from its own thread: keep our count apart
    for i in range(20):
        with Workflow(wait=True):
            image, _ = LoadImage('cs.png')
            SaveImage(image, 'cs')
        out.write(f'done {i}\\n')
        out.flush()
"""


def test_comfy_script_identical_resubmissions_never_hang(server: dict[str, Any], tmp_path: Path) -> None:
    """After the first run every submission is served from the cache: its whole message sequence
    is ready at once, and must still come after the reply that tells the client the prompt id."""
    png_file(server["data"] / "input" / "cs.png", (5, 5, 5), (16, 16))
    script = tmp_path / "cs.py"
    script.write_text(COMFY_SCRIPT)
    progress = tmp_path / "done.txt"
    run = subprocess.run([sys.executable, str(script), server["url"] + "/", str(progress)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    done = progress.read_text().split("\n") if progress.exists() else []
    assert run.returncode == 0 and done == [f"done {i}" for i in range(20)] + [""], (run.stdout[-2000:],
                                                                                    run.stderr[-3000:])
    assert "Failed to watch" not in run.stdout + run.stderr


# -- our own client, written from ComfyUI's protocol description -------------------------------------

def _messages_until_done(ws: Any, prompt_id: str, timeout: float = 120) -> tuple[list[dict], list[bytes]]:
    texts, frames = [], []
    deadline = time.monotonic() + timeout
    while True:
        msg = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            frames.append(msg)
            continue
        data = json.loads(msg)
        texts.append(data)
        if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == prompt_id:
            return texts, frames


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_own_websocket_client_follows_comfyuis_protocol(server: dict[str, Any]) -> None:
    from websockets.sync.client import connect

    png_file(server["data"] / "input" / "own.png", (10, 120, 200))
    client_id = uuid.uuid4().hex
    with connect(f"ws://127.0.0.1:{server['port']}/ws?clientId={client_id}") as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "status" and hello["data"]["sid"] == client_id
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": False}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "feature_flags"

        # 1. no preview method anywhere: progress messages, no binary frame
        prompt = img2img_prompt(server["ckpt"], "own.png", seed=7)
        prompt["11"] = {"class_type": "ImageResize", "inputs": {"image": ["10", 0], "width": 64, "height": 64}}
        prompt["12"]["inputs"]["pixels"] = ["11", 0]  # a node that always reports what it did
        reply = _post(f"{server['url']}/prompt", {"prompt": prompt, "client_id": client_id})
        assert set(reply) >= {"prompt_id", "number", "node_errors"} and reply["node_errors"] == {}
        texts, frames = _messages_until_done(ws, reply["prompt_id"])
        kinds = [m["type"] for m in texts if m["type"] != "status"]
        assert kinds[0] == "execution_start" and kinds[-2:] == ["execution_success", "executing"]
        progress = [m["data"] for m in texts if m["type"] == "progress"]
        assert all(p["prompt_id"] == reply["prompt_id"] for p in progress)
        sampler = [p for p in progress if p["node"] == "3"]
        assert sampler and sampler[-1]["value"] == sampler[-1]["max"] == 3
        kinds_of_frames = [struct.unpack(">I", f[:4])[0] for f in frames]
        assert 1 not in kinds_of_frames, "no PREVIEW_IMAGE frame: nobody asked for previews"
        # this client negotiated features, so it also gets TEXT (progress_text) frames:
        # [type 3][len(node id)][node id][utf-8 text], here ImageResize's note on what it did
        texts_by_node = {}
        for f in frames:
            (n,) = struct.unpack(">I", f[4:8])
            texts_by_node[f[8:8 + n].decode()] = f[8 + n:].decode()
        assert set(kinds_of_frames) == {3} and "64" in texts_by_node["11"], texts_by_node
        executed = [m["data"] for m in texts if m["type"] == "executed"]
        assert executed[-1]["node"] == "9" and executed[-1]["output"]["images"][0]["type"] == "output"

        # 2. the job asks for previews: PREVIEW_IMAGE frames, [type 1][image type][JPEG or PNG bytes]
        reply = _post(f"{server['url']}/prompt", {"prompt": img2img_prompt(server["ckpt"], "own.png", seed=8),
                                                  "client_id": client_id,
                                                  "extra_data": {"preview_method": "auto"}})
        texts, frames = _messages_until_done(ws, reply["prompt_id"])
        frames = [f for f in frames if struct.unpack(">I", f[:4])[0] != 3]
        assert frames, "previews were asked for"
        for frame in frames:
            event, image_type = struct.unpack(">II", frame[:8])
            assert event == 1 and image_type in (1, 2)
            Image.open(io.BytesIO(frame[8:])).load()

        # 3. history has the job with ComfyUI's shape
        history = json.loads(urllib.request.urlopen(f"{server['url']}/history/{reply['prompt_id']}").read())
        entry = history[reply["prompt_id"]]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert entry["outputs"]["9"]["images"][0]["filename"].startswith("ComfyUI_")
