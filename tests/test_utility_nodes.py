"""ComfyUI's small nodes: primitives, StringConcatenate, GetImageSize, PreviewAny,
SaveImageWebsocket (its frames read by a websocket client written to ComfyUI's
documented protocol, on a real server)."""
from __future__ import annotations

import io
import json
import struct
import sys

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import Environment
from engine.executor import Executor
from engine.registry import default_registry
from engine.server.app import make_app
from engine.workflow import parse
from nodes import primitives, utility


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def test_declarations_match_functions_and_comfyui(registry):
    for spec in (primitives.primitive_int, primitives.primitive_float, primitives.primitive_string,
                 primitives.primitive_string_multiline, primitives.primitive_boolean, primitives.string_concatenate,
                 utility.get_image_size, utility.preview_any, utility.save_image_websocket):
        assert spec.signature_mismatches() == []
        assert registry.get(spec.type) is spec
    info = registry.get("PrimitiveInt").object_info()
    assert info["input"]["required"]["value"] == ["INT", {"default": 0, "min": -sys.maxsize, "max": sys.maxsize,
                                                         "control_after_generate": True}]
    concat = registry.get("StringConcatenate").object_info()
    assert concat["input_order"]["required"] == ["string_a", "string_b", "delimiter"]
    assert registry.get("GetImageSize").object_info()["output_name"] == ["width", "height", "batch_size"]
    assert registry.get("SaveImageWebsocket").output_node and registry.get("PreviewAny").output_node


def test_primitives_concatenate_and_preview_through_the_executor(registry, tmp_path):
    doc = {"version": 1, "nodes": {
        "1": {"type": "PrimitiveStringMultiline", "inputs": {"value": "a red barn"}},
        "2": {"type": "PrimitiveString", "inputs": {"value": "at dusk"}},
        "3": {"type": "StringConcatenate", "inputs": {"string_a": ["1", 0], "string_b": ["2", 0], "delimiter": ", "}},
        "4": {"type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "5": {"type": "PrimitiveInt", "inputs": {"value": "-7"}},
        "6": {"type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "7": {"type": "PrimitiveBoolean", "inputs": {"value": True}},
        "8": {"type": "PreviewAny", "inputs": {"source": ["7", 0]}},
        "9": {"type": "PrimitiveFloat", "inputs": {"value": 0.25}},
        "10": {"type": "PreviewAny", "inputs": {"source": ["9", 0]}}}}
    outcome = Executor(registry, Environment.for_folder(tmp_path)).run(parse(doc))
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["4"] == {"text": ["a red barn, at dusk"]}
    assert outcome.outputs["6"] == {"text": ["-7"]} and outcome.outputs["8"] == {"text": ["True"]}
    assert outcome.outputs["10"] == {"text": ["0.25"]}


def test_preview_text_follows_comfyui():
    assert utility.preview_text(None) == "None"
    assert utility.preview_text({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert utility.preview_text(3) == "3"
    assert utility.preview_text(torch.zeros(1)) == str(torch.zeros(1))  # not JSON: str()


def test_get_image_size_reports_and_shows_the_size():
    from node_call import Called, call

    record = Called()
    width, height, batch = call(utility.get_image_size, None, record, image=torch.zeros(3, 40, 24, 3))
    assert (width, height, batch) == (24, 40, 3)
    assert record.messages == ["width: 24, height: 40\n batch size: 3"]


@pytest.fixture
async def server(aiohttp_client, tmp_path):
    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows")
    return await aiohttp_client(app), tmp_path / "data"


async def test_save_image_websocket_sends_full_size_pngs_in_comfyui_frames(server):
    """ComfyUI's websocket-image example: queue a prompt with SaveImageWebsocket, read the binary
    frames ([u32 BE 1 = PREVIEW_IMAGE][u32 BE 2 = PNG][PNG]) until `executing` with node null."""
    client, data = server
    (data / "input").mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(data / "input" / "src.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "src.png"}},
              "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
    ws = await client.ws_connect("/ws?clientId=ws-example")
    await ws.receive_json()  # status with sid
    for run in range(2):  # the second run is not served from the cache: it sends again
        r = await client.post("/prompt", json={"prompt": prompt, "client_id": "ws-example"})
        assert r.status == 200, await r.text()
        prompt_id = (await r.json())["prompt_id"]
        frames = []
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type == aiohttp.WSMsgType.BINARY:
                frames.append(msg.data)
                continue
            message = json.loads(msg.data)
            if message["type"] == "executing" and message["data"]["node"] is None \
                    and message["data"]["prompt_id"] == prompt_id:
                break
        assert len(frames) == 1, run
        assert struct.unpack(">II", frames[0][:8]) == (1, 2)
        received = np.asarray(Image.open(io.BytesIO(frames[0][8:])).convert("RGB"))
        assert received.shape == (20, 36, 3) and np.array_equal(received, pixels)
    await ws.close()
