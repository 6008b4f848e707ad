"""Bypass and mute (ComfyUI's node modes 4 and 2) apply the same from every front door.

A Kiln document keeps a node's mode in ``ui.mode`` (what the editor saves). The
rule lives in engine/modes.py and is applied by validation, so ``kiln run``,
``POST /api/jobs`` and ``POST /prompt`` run the same graph the editor shows; the
stored document keeps the bypassed node, and the ``prompt`` PNG chunk (ComfyUI's
API format, which has no modes) is what ran.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.modes import apply_modes, bypass_index
from engine.registry import default_registry
from engine.validate import WorkflowInvalid, validate
from engine.workflow import Link, parse
from server_helpers import wait_status

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def invert_doc(mode: Any = None) -> dict[str, Any]:
    """LoadImage -> ImageInvert -> SaveImage, the invert node in ``mode``."""
    invert: dict[str, Any] = {"type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    if mode is not None:
        invert["ui"] = {"mode": mode, "pos": [300, 40]}
    return {"version": 1, "params": {"image": "1.image"}, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": invert,
        "3": {"type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "modes"}},
    }}


def test_bypass_index_is_comfyuis_rule():
    # same index when it fits the output and the reader
    assert bypass_index(["MODEL", "CLIP"], 1, "CLIP", "CLIP") == 1
    # else the first input of exactly the reader's type
    assert bypass_index(["IMAGE", "LATENT"], 0, "LATENT", "LATENT") == 1
    # else the first that fits both; -1 when none does
    assert bypass_index(["IMAGE", "*"], 0, "LATENT", "LATENT") == 1
    assert bypass_index(["IMAGE"], 0, "LATENT", "LATENT") == -1
    # a reader of any type takes the same index, or the first input
    assert bypass_index(["A", "B"], 1, "B", "*") == 1 and bypass_index(["A"], 3, "B", "*") == 0


def test_bypass_passes_the_matching_input_through_and_keeps_the_document(registry):
    doc = {"version": 1, "nodes": {
        "1": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "2": {"type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "l.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0}, "ui": {"mode": 4}},
        "3": {"type": "LoraLoader", "inputs": {"model": ["2", 0], "clip": ["2", 1], "lora_name": "m.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0}, "ui": {"mode": "bypass"}},
        "4": {"type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["3", 1]}},
        "5": {"type": "ImageInvert", "inputs": {"image": ["6", 0]}},
        "6": {"type": "LoadImage", "inputs": {"image": "p.png"}, "ui": {"mode": "mute"}},
    }}
    wf = parse(doc)
    active = apply_modes(wf, registry)
    assert set(active.nodes) == {"1", "4", "5"}
    assert active.nodes["4"].inputs["clip"] == Link("1", 1), "CLIP through two bypassed LoRAs, by its own slot"
    assert "image" not in active.nodes["5"].inputs, "what a muted node fed is unconnected"
    assert set(wf.nodes) == {"1", "2", "3", "4", "5", "6"} and wf.nodes["4"].inputs["clip"] == Link("3", 1)
    assert apply_modes(parse(invert_doc()), registry).nodes["3"].inputs["images"] == Link("2", 0)


def test_validation_plans_what_runs_and_names_the_reader_of_a_muted_node(registry):
    plan = validate(parse(invert_doc("bypass")), registry)
    assert plan.order == ["1", "3"] and plan.nodes["3"].links["images"] == Link("1", 0)
    assert plan.workflow.to_kiln()["nodes"]["2"]["ui"]["mode"] == "bypass", "the document keeps the node"
    assert plan.api_prompt() == {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
                                 "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "modes"}}}
    with pytest.raises(WorkflowInvalid) as info:
        validate(parse(invert_doc("mute")), registry)
    (err,) = info.value.errors
    assert (err.node_id, err.node_type, err.input_name, err.type) == ("3", "SaveImage", "images", "required_input_missing")


# -- the front doors ------------------------------------------------------------------------


def write_photo(folder: Path) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(16 * 12 * 3, dtype=np.uint32).reshape(12, 16, 3) * 7 % 256).astype(np.uint8)
    Image.fromarray(arr).save(folder / "photo.png")
    return arr


def cli_run(project: Path, doc: dict[str, Any]) -> tuple[np.ndarray, dict[str, str]]:
    (project / "wf.json").write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "run", "wf.json"], cwd=project,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    (saved,) = proc.stdout.split()
    with Image.open(saved) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_kiln_run_honours_bypass_and_mute(tmp_path: Path):
    photo = write_photo(tmp_path / "input")
    inverted, _ = cli_run(tmp_path, invert_doc())
    assert np.array_equal(inverted, 255 - photo)
    passed, text = cli_run(tmp_path, invert_doc("bypass"))
    assert np.array_equal(passed, photo), "the bypassed invert passes its input through"
    assert "2" not in json.loads(text["prompt"]), "the prompt chunk is what ran"
    assert json.loads(text["kiln_workflow"])["nodes"]["2"]["ui"]["mode"] == "bypass", "the graph keeps the node"
    (tmp_path / "wf.json").write_text(json.dumps(invert_doc("mute")))
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "run", "wf.json"], cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "images" in proc.stderr and "SaveImage" in proc.stderr


async def test_api_jobs_and_prompt_honour_bypass_like_the_cli(aiohttp_client: Any, tmp_path: Path, registry):
    from engine.server.app import make_app

    photo = write_photo(tmp_path / "data" / "input")
    client = await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows",
                                           registry=registry))
    out = tmp_path / "data" / "output"

    async def result(job_id: str) -> np.ndarray:
        job = await wait_status(client, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        (image,) = [i for node in job["outputs"].values() for i in node.get("images", [])]
        return np.asarray(Image.open(out / image.get("subfolder", "") / image["filename"]).convert("RGB"))

    r = await client.post("/api/jobs", json={"workflow": invert_doc("bypass")})
    assert r.status in (200, 201, 202), await r.text()
    assert np.array_equal(await result((await r.json())["job_id"]), photo)
    r = await client.post("/prompt", json={"prompt": invert_doc("bypass")})
    assert r.status == 200, await r.text()
    assert np.array_equal(await result((await r.json())["prompt_id"]), photo)
    r = await client.post("/api/jobs", json={"workflow": invert_doc()})
    assert np.array_equal(await result((await r.json())["job_id"]), 255 - photo)
    # A muted node is refused at the door, naming the reader, as the CLI does.
    r = await client.post("/api/jobs", json={"workflow": invert_doc("mute")})
    assert r.status == 400 and "images" in await r.text()
    # Export to ComfyUI's API format applies the modes (the editor's "Export API").
    r = await client.post("/api/convert/api", json=invert_doc("bypass"))
    assert r.status == 200 and (await r.json())["3"]["inputs"]["images"] == ["1", 0]
