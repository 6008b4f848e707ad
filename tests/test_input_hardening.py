"""No 500s from input: each hostile or careless request gets a 400 with a clear message.

Every case runs against a real server (the real node library, a SQLite file, a
loopback port); the fuzz test at the end throws 500+ mutated workflows at both
submission routes and checks that none gets a 5xx, none hangs, and the server
still answers.
"""
from __future__ import annotations

import asyncio
import copy
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from engine.context import Settings
from engine.registry import default_registry
from test_cli import kiln as run_kiln

RESIZE = {"version": 1, "nodes": {
    "1": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
    "2": {"type": "ImageResize", "inputs": {"image": ["1", 0], "width": 32, "height": 24, "mode": "stretch"}},
    "3": {"type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fuzz"}}}}
API = {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
       "2": {"class_type": "ImageResize", "inputs": {"image": ["1", 0], "width": 32, "height": 24}},
       "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fuzz"}}}


@pytest.fixture
async def server(aiohttp_client: Any, tmp_path: Path) -> Any:
    from engine.server.app import make_app

    # Small limits: a mutated workflow that passes validation must stay cheap to run.
    settings = Settings(max_image_pixels=256 * 256, max_job_bytes=64 << 20)
    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=default_registry(),
                   env_settings=settings)
    Image.new("RGB", (64, 48), (200, 40, 10)).save(tmp_path / "data" / "input" / "photo.png")
    return await aiohttp_client(app)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


async def post_raw(client: Any, path: str, text: str) -> tuple[int, Any]:
    r = await client.post(path, data=text.encode(), headers={"Content-Type": "application/json"})
    body = await r.text()
    return r.status, (json.loads(body) if body.startswith("{") else body)


def message_of(body: dict) -> str:
    return json.dumps(body)


async def test_json_nested_absurdly_deep_is_a_400_on_both_routes(server):
    for levels in (100, 100_000):
        for path, template in (("/prompt", '{"prompt": %s}'), ("/api/jobs", '{"workflow": %s}')):
            status, body = await post_raw(server, path, template % deep(levels))
            assert status == 400, (path, levels, body)
            assert "nests deeper than 64 levels" in message_of(body)
    # nested inside an otherwise good workflow's input
    doc = copy.deepcopy(RESIZE)
    text = json.dumps({"workflow": doc}).replace('"fuzz"', deep(5000))
    status, body = await post_raw(server, "/api/jobs", text)
    assert status == 400 and "nests deeper" in message_of(body)


async def test_a_lone_surrogate_in_any_string_is_a_400_naming_where(server):
    doc = copy.deepcopy(RESIZE)
    doc["nodes"]["3"]["inputs"]["filename_prefix"] = "cat\ud800"
    r = await server.post("/api/jobs", json={"workflow": doc})  # json.dumps escapes it as \ud800
    assert r.status == 400
    assert "workflow.nodes.3.inputs.filename_prefix contains a lone UTF-16 surrogate" in await r.text()
    api = copy.deepcopy(API)
    api["1"]["inputs"]["image"] = "\udfff.png"
    r = await server.post("/prompt", json={"prompt": api})
    assert r.status == 400 and "surrogate" in await r.text()


async def test_names_too_long_or_too_deep_for_the_file_system_are_refused_at_validation(server):
    cases = [("1", "image", "a" * 300 + ".png", "longer than 255 bytes"),
             ("3", "filename_prefix", "b" * 300, "longer than 255 bytes"),
             ("3", "filename_prefix", "d/" * 3000 + "x", "nest at most 32 deep")]
    for node_id, input_name, value, expect in cases:
        api = copy.deepcopy(API)
        api[node_id]["inputs"][input_name] = value
        r = await server.post("/prompt", json={"prompt": api})
        body = await r.json()
        assert r.status == 400, body
        (error,) = body["node_errors"][node_id]["errors"]
        assert error["extra_info"]["input_name"] == input_name and expect in error["message"]
        assert len(json.dumps(body)) < 20_000  # no traceback, no megabytes
    # nothing was stored and nothing was created
    assert (await (await server.get("/api/jobs")).json())["total"] == 0


def multipart(png: bytes, disposition: str, subfolder: str) -> tuple[bytes, str]:
    """A multipart body built by hand: aiohttp's client refuses to send a NUL in a header."""
    boundary = "kilnfuzzboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; {disposition}\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\n"
            f"{subfolder}\r\n--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def test_uploads_with_deep_subfolders_or_nul_names_are_400(server, tmp_path):
    import io

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for subfolder, disposition, expect in (("s/" * 3000, 'filename="a.png"', "nest at most"),
                                           ("x" * 300, 'filename="a.png"', "longer than 255"),
                                           ("", "filename*=UTF-8''a%00b.png", "control characters"),
                                           ("", 'filename="a\x00b.png"', "malformed multipart"),
                                           ("", f'filename="{"c" * 300}.png"', "longer than 255")):
        body, kind = multipart(png.getvalue(), disposition, subfolder)
        r = await server.post("/upload/image", data=body, headers={"Content-Type": kind})
        # a name no file system holds is bad input (400); only an escape attempt is refused with 403
        assert r.status == 400, (subfolder[:10], disposition[:30], await r.text())
        assert expect in await r.text()


async def test_ids_and_extra_data_follow_one_rule_on_both_routes(server):
    long_id = "p" * 201
    r = await server.post("/prompt", json={"prompt": API, "prompt_id": long_id})
    assert r.status == 400 and "at most 200 characters" in await r.text()
    for path, body in (("/prompt", {"prompt": API}), ("/api/jobs", {"workflow": RESIZE})):
        r = await server.post(path, json={**body, "client_id": "c" * 201})
        assert r.status == 400 and "'client_id'" in await r.text(), path
        for extra in ("a string", [1, 2], {"extra_pnginfo": [1]}, {"extra_pnginfo": "x"}):
            r = await server.post(path, json={**body, "extra_data": extra})
            assert r.status == 400 and "extra_data" in await r.text(), (path, extra)
    # an id of the largest accepted length is reachable through /api/jobs
    ok_id = "q" * 200
    r = await server.post("/prompt", json={"prompt": API, "prompt_id": ok_id})
    assert r.status == 200
    assert (await server.get(f"/api/jobs/{ok_id}")).status == 200
    assert (await (await server.get("/api/jobs")).json())["total"] == 1


def test_kiln_validate_exits_2_with_a_message_not_a_traceback(tmp_path: Path):
    (tmp_path / "input").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "input" / "photo.png")
    (tmp_path / "deep.json").write_text('{"version": 1, "nodes": {"1": %s}}' % deep(100_000))
    doc = copy.deepcopy(RESIZE)
    doc["nodes"]["3"]["inputs"]["filename_prefix"] = "x\ud800"
    (tmp_path / "surrogate.json").write_text(json.dumps(doc))
    doc["nodes"]["3"]["inputs"]["filename_prefix"] = "d/" * 3000 + "x"
    (tmp_path / "deep_prefix.json").write_text(json.dumps(doc))
    for name, expect in (("deep.json", "nests deeper"), ("surrogate.json", "surrogate"),
                         ("deep_prefix.json", "nest at most 32 deep")):
        proc = run_kiln("validate", name, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- the fuzz test -------------------------------------------------------------------

NASTY: list[Any] = [
    None, True, False, 0, -1, 2**63, -(2**70), 1e308, -1e-308, 0.5, "", " ", "\x00", "a\x00b", "\ud800",
    "../../etc/passwd", "/etc/passwd", "..\\..\\win.ini", "%2e%2e/%2e%2e/x", "x" * 300, "d/" * 600,
    "http://127.0.0.1:1/x.png", "file:///etc/passwd", [], {}, [None], ["1"], ["1", 0], ["1", -1], ["9999", 0],
    ["1", 1e300], ["1", 0, 0], {"__value__": [1, 2]}, {"__value__": {"a": 1}}, "__DEEP__", "NaN",
    [["1", 0]], {"class_type": "SaveImage"}, "💥" * 50, "\u202e", 12345678901234567890,
]


def mutate(doc: Any, rng: random.Random, rounds: int) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rounds):
        paths: list[tuple[Any, Any]] = []
        stack = [doc]
        while stack:
            item = stack.pop()
            keys = list(item) if isinstance(item, dict) else range(len(item)) if isinstance(item, list) else []
            for k in keys:
                paths.append((item, k))
                stack.append(item[k])
        if not paths:
            return rng.choice(NASTY)
        parent, key = rng.choice(paths)
        op = rng.random()
        if op < 0.55:
            parent[key] = copy.deepcopy(rng.choice(NASTY))
        elif op < 0.7 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.85 and isinstance(parent, dict):
            parent[rng.choice(["", "\x00", "💥", "x" * 300, "__proto__", "class_type", "inputs", "999"])] = \
                copy.deepcopy(rng.choice(NASTY))
        else:
            parent[key] = copy.deepcopy(parent[key]) if rng.random() < 0.5 else [parent[key]] * 3
    return doc


def envelope(route: str, rng: random.Random, i: int) -> Any:
    if route == "/prompt":
        body: Any = {"prompt": copy.deepcopy(API), "client_id": f"fuzz{i}"}
        extras = {"extra_data": {"extra_pnginfo": {"workflow": {}}}, "prompt_id": f"id-{i}", "number": 3,
                  "front": False, "partial_execution_targets": ["3"]}
    else:
        body = {"workflow": copy.deepcopy(RESIZE), "params": {}, "client_id": f"fuzz{i}"}
        extras = {"extra_data": {}, "job_id": f"job-{i}", "outputs": ["3"], "force": True}
    for key, value in extras.items():
        if rng.random() < 0.3:
            body[key] = value
    return mutate(body, rng, rng.randint(1, 4))


def encode(body: Any, rng: random.Random) -> bytes:
    text = json.dumps(body)
    return text.replace('"__DEEP__"', deep(rng.choice([10, 70, 3000, 50_000]))).encode()


async def test_fuzz_500_mutated_workflows_on_both_routes_never_5xx_never_hang(server):
    rng = random.Random(1313)
    statuses: dict[int, int] = {}
    for i in range(560):
        route = "/prompt" if i % 2 == 0 else "/api/jobs"
        data = encode(envelope(route, rng, i), rng)
        r = await asyncio.wait_for(server.post(route, data=data, headers={"Content-Type": "application/json"}),
                                   timeout=20)
        text = await r.text()
        assert r.status < 500, (route, data[:300], text[:500])
        assert len(text) < 200_000, (route, data[:300])
        statuses[r.status] = statuses.get(r.status, 0) + 1
    # both refusals and accepted jobs were exercised, and the server still answers
    assert statuses.get(400, 0) > 100 and statuses.get(200, 0) + statuses.get(201, 0) > 10, statuses
    r = await asyncio.wait_for(server.get("/api/jobs?limit=5"), timeout=20)
    assert r.status == 200
    assert (await server.post("/api/jobs", json={"workflow": RESIZE})).status == 201
