"""``kiln serve --safety-filter blur``: a real server process enforces the filter on a graph without one.

The graph saves a flagged image (A) and one that passes (B) with SaveImage, previews A
with PreviewImage, and samples an image with the tiny SD1 model (whose sampler sends
preview frames). Nothing in it asks for a filter; the server filters anyway, and says
so in the ``executed`` messages, history, the job API and the PNGs. The expected
pixels come from the same checker and guard run here in-process (the server runs on
the CPU too, so both see the same sampler previews).
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
import tiny_safety
from browser_support import stop_process
from engine.context import Environment, Paths
from engine.events import Progress
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from nodes.runtime.models import ModelManager
from nodes.safety.guard import build_guard
from nodes.safety.modes import blur_sigma, gaussian_blur
from server_helpers import free_port, wait_up
from test_server_ws import comfy_messages_until_done

REPO = Path(__file__).resolve().parents[1]
CHECKER = "tiny-checker.safetensors"
CKPT = tiny_models.checkpoint_name("sd1")


def prompt() -> dict:
    """ComfyUI API format, as a ComfyUI client would send it: no filter node anywhere."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "b"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        **sampler_nodes(),
    }


def sampler_nodes() -> dict:
    return {
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["10", 1]}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]}},
        "13": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "14": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 3, "cfg": 5.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 1.0, "model": ["10", 0],
                                                    "positive": ["11", 0], "negative": ["12", 0],
                                                    "latent_image": ["13", 0]}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["10", 2]}},
        "16": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_models_dir):
    root = tmp_path_factory.mktemp("safety-server")
    models = root / "models"
    tiny_safety.save_models(models)
    (models / "checkpoints").mkdir()
    shutil.copy(tiny_models_dir / "checkpoints" / CKPT, models / "checkpoints" / CKPT)
    (root / "data" / "input").mkdir(parents=True)
    tiny_safety.image_a().save(root / "data" / "input" / "a.png")
    tiny_safety.image_b().save(root / "data" / "input" / "b.png")
    return root


def serve_command(site: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--data", str(site / "data"), "--models", str(site / "models"), "--workflows", str(site / "workflows"),
            *extra]


def child_env() -> dict[str, str]:
    # The CPU, as in this process, so the server's sampler previews equal the ones computed here.
    return {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def local_reference(site: Path, tmp_path: Path) -> tuple[list, list, bool]:
    """This process's sampler previews, what the guard makes of them, and the decoded image's flag."""
    env = Environment(paths=Paths.under(tmp_path / "ref", models=site / "models"), models=ModelManager(device="cpu"))
    registry = default_registry()
    events: list = []
    outcome = Executor(registry, env).run(parse(sampler_nodes()), on_event=events.append)
    assert outcome.status == "succeeded", outcome.error
    guard = build_guard(env, "blur", CHECKER)
    guard.preview_share = 1.0  # what each preview becomes if checked (the server may withhold some)
    raw = [e.preview for e in events if isinstance(e, Progress) and e.preview is not None]
    decoded_flag = guard.checker.flags(outcome.results["15"][0])[0]
    return raw, [guard.check_preview(p) for p in raw], decoded_flag


def test_an_enforced_filter_blurs_what_a_graph_without_one_saves_previews_and_streams(site, tmp_path):
    raw, expected, decoded_flag = local_reference(site, tmp_path)
    assert raw and any(not np.array_equal(pixels(r.data), pixels(e.data)) for r, e in zip(raw, expected))

    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(serve_command(site, port, "--safety-filter", "blur", "--safety-checker", CHECKER),
                            cwd=tmp_path, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        texts, frames, history, job, files = asyncio.run(_drive(f"http://127.0.0.1:{port}", proc))
    finally:
        stop_process(proc)
        log.close()
    server_log = (tmp_path / "server.log").read_text(errors="replace")
    assert "safety filter on" in server_log

    executed = {m["data"]["node"]: m["data"]["output"] for m in texts if m["type"] == "executed"}
    flags = {node: [img["filtered"] for img in out["images"]] for node, out in executed.items() if "images" in out}
    assert flags == {"3": [True], "4": [False], "5": [True], "16": [decoded_flag]}
    assert {n: [i["filtered"] for i in o["images"]] for n, o in history["outputs"].items()} == flags
    assert {(a["node_id"], a["finish_reason"]) for a in job["artifacts"]} == {
        ("3", "FILTER"), ("4", "SUCCESS"), ("5", "FILTER"), ("16", "FILTER" if decoded_flag else "SUCCESS")}

    a, b = (np.asarray(im, dtype=np.float32) / 255.0 for im in (tiny_safety.image_a(), tiny_safety.image_b()))
    blurred_a = gaussian_blur(torch.from_numpy(a)[None], blur_sigma(64, 64))[0].numpy()
    for node, want in (("3", blurred_a), ("4", b), ("5", blurred_a)):
        data, text = files[node]
        assert np.abs(pixels(data) - want).max() <= 1 / 255 + 1e-6, node  # the file itself is filtered
        assert json.loads(text["kiln_safety"])["filtered"] is (node != "4")
        assert json.loads(text["prompt"])["3"]["class_type"] == "SaveImage"  # the usual metadata stays

    previews = [f[8:] for f in frames if struct.unpack(">II", f[:8])[0] == 1]
    assert previews, "the sampler's preview frames were not streamed"
    for frame in previews:  # each is what the guard makes of one of the sampler's previews
        shown = pixels(frame)
        best = min(float(np.abs(shown - pixels(e.data)).max()) for e in expected)
        assert best <= 4 / 255, best
    flagged_raw = [pixels(r.data) for r, e in zip(raw, expected) if r is not e]
    assert not any(np.array_equal(pixels(frame), r) for frame in previews for r in flagged_raw)


async def _drive(base: str, proc: subprocess.Popen):
    async with aiohttp.ClientSession() as session:
        await wait_up(session, base, proc, timeout=120)
        ws = await session.ws_connect(f"{base}/ws?clientId=safety")
        await ws.receive_json()
        r = await session.post(f"{base}/prompt", json={"prompt": prompt(), "client_id": "safety",
                                                          # previews are opt-in per job, as in ComfyUI
                                                          "extra_data": {"preview_method": "auto"}})
        assert r.status == 200, await r.text()
        pid = (await r.json())["prompt_id"]
        texts, frames = await comfy_messages_until_done(ws, pid, timeout=240)
        assert any(m["type"] == "execution_success" for m in texts), texts
        history = (await (await session.get(f"{base}/history/{pid}")).json())[pid]
        job = await (await session.get(f"{base}/api/jobs/{pid}")).json()
        files = {}
        for node in ("3", "4", "5"):
            [entry] = history["outputs"][node]["images"]
            r = await session.get(f"{base}/view", params={k: entry[k] for k in ("filename", "subfolder", "type")})
            assert r.status == 200
            data = await r.read()
            with Image.open(io.BytesIO(data)) as im:
                files[node] = (data, dict(im.text))
        await ws.close()
        return texts, frames, history, job, files


@pytest.mark.parametrize("extra,needle", [
    (["--safety-filter", "blur", "--safety-checker", "missing.safetensors"], "safety_checker"),
    (["--safety-filter", "smudge", "--safety-checker", CHECKER], "unknown mode 'smudge'"),
    (["--safety-checker", CHECKER], "needs --safety-filter"),
])
def test_the_server_refuses_to_start_with_a_filter_it_cannot_apply(site, tmp_path, extra, needle):
    """Exit 2 before listening. (A foreign checker file takes the same path: test_safety.py checks its message.)"""
    done = subprocess.run(serve_command(site, free_port(), *extra), cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    if "missing" in " ".join(extra):  # it says where the file goes
        assert str(site / "models" / "safety_checker") in done.stderr
        assert "StableDiffusionSafetyChecker" in done.stderr
