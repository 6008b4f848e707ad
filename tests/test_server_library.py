"""The workflow library routes and the OpenAPI document, on a real server."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

import stub_nodes

WORKFLOW = {"version": 1, "title": "Add two", "description": "1 + 2, shown",
            "params": {"a": "1.value"},
            "nodes": {"1": {"type": "Number", "inputs": {"value": 1.0}},
                      "2": {"type": "Add", "inputs": {"a": ["1", 0], "b": 2.0}},
                      "3": {"type": "Format", "inputs": {"value": ["2", 0]}},
                      "4": {"type": "Show", "inputs": {"text": ["3", 0]}}}}
API_PROMPT = {"1": {"class_type": "Number", "inputs": {"value": 3.0}, "_meta": {"title": "n"}},
              "2": {"class_type": "Format", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"text": ["2", 0]}}}


@pytest.fixture
async def app_and_client(aiohttp_client: Any, tmp_path: Path) -> Any:
    from engine.server.app import make_app

    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=stub_nodes.make_registry())
    return app, await aiohttp_client(app)


@pytest.fixture
def client(app_and_client: Any) -> Any:
    return app_and_client[1]


@pytest.fixture
def library(tmp_path: Path) -> Path:
    return tmp_path / "workflows"


async def test_crud(client: Any, library: Path) -> None:
    assert await (await client.get("/api/workflows")).json() == []
    r = await client.put("/api/workflows/add.json", json=WORKFLOW)
    assert r.status == 201, await r.text()
    entry = await r.json()
    assert entry["name"] == "add.json" and entry["title"] == "Add two"
    assert json.loads((library / "add.json").read_text()) == WORKFLOW
    assert (library / "add.json").stat().st_mode & 0o777 == 0o644, "readable like the shipped workflows"

    r = await client.put("/api/workflows/api.json", json=API_PROMPT)
    assert r.status == 201
    listing = await (await client.get("/api/workflows")).json()
    assert [e["name"] for e in listing] == ["add.json", "api.json"]
    add = listing[0]
    assert add["title"] == "Add two" and add["description"] == "1 + 2, shown"
    assert re.match(r"\d{4}-\d\d-\d\dT", add["modified"])
    assert listing[1]["title"] is None

    r = await client.get("/api/workflows/add.json")
    assert r.status == 200 and r.content_type == "application/json"
    assert await r.json() == WORKFLOW

    changed = {**WORKFLOW, "title": "Add two (v2)"}
    r = await client.put("/api/workflows/add.json", json=changed)
    assert r.status == 200
    assert (await (await client.get("/api/workflows/add.json")).json())["title"] == "Add two (v2)"

    r = await client.delete("/api/workflows/add.json")
    assert r.status == 204
    assert not (library / "add.json").exists()
    assert (await client.get("/api/workflows/add.json")).status == 404
    assert (await client.delete("/api/workflows/add.json")).status == 404
    assert [e["name"] for e in await (await client.get("/api/workflows")).json()] == ["api.json"]
    # no temporary files are left behind by the atomic writes
    assert sorted(os.listdir(library)) == ["api.json"]


async def test_saved_workflow_runs(client: Any) -> None:
    """What the library stores is what the job API runs."""
    await client.put("/api/workflows/add.json", json=WORKFLOW)
    doc = await (await client.get("/api/workflows/add.json")).json()
    r = await client.post("/api/jobs", json={"workflow": doc, "params": {"a": 5.0}})
    assert r.status == 201, await r.text()


async def test_subfolders(client: Any, library: Path) -> None:
    r = await client.put("/api/workflows/mine/add.json", json=WORKFLOW)
    assert r.status == 201
    assert (library / "mine" / "add.json").is_file()
    names = [e["name"] for e in await (await client.get("/api/workflows")).json()]
    assert names == ["mine/add.json"]
    assert (await client.get("/api/workflows/mine/add.json")).status == 200
    assert (await client.get("/api/workflows/mine%2Fadd.json")).status == 200


async def test_put_refuses_what_is_not_a_workflow(client: Any, library: Path) -> None:
    for body in (b"{not json", b"[1, 2]", b'"text"', b'{"foo": 1}', b'{"version": 99, "nodes": {}}', b""):
        r = await client.put("/api/workflows/bad.json", data=body, headers={"Content-Type": "application/json"})
        assert r.status == 400, (body, r.status)
        assert (await r.json())["error"]["message"]
    r = await client.put("/api/workflows/big.json", data=b" " * (9 * 1024 * 1024),
                         headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert not library.exists() or os.listdir(library) == []
    # an invalid save never damages the existing file
    await client.put("/api/workflows/add.json", json=WORKFLOW)
    await client.put("/api/workflows/add.json", data=b"{broken", headers={"Content-Type": "application/json"})
    assert json.loads((library / "add.json").read_text()) == WORKFLOW


async def test_bad_names_are_refused(client: Any, library: Path, tmp_path: Path) -> None:
    (tmp_path / "outside.json").write_text(json.dumps({"secret": "TOP-SECRET"}))
    library.mkdir(exist_ok=True)
    os.symlink(tmp_path / "outside.json", library / "link.json")
    os.symlink(tmp_path, library / "out")
    bad = ["notes.txt", "noext", ".hidden.json", "..%2Foutside.json", "%2e%2e%2foutside.json",
           "%252e%252e%252foutside.json", "%2Ftmp%2Foutside.json", "..%5Coutside.json", "link.json",
           "out/outside.json", "out%2Foutside.json", "a" * 300 + ".json"]
    for name in bad:
        for method, kwargs in (("GET", {}), ("PUT", {"json": WORKFLOW}), ("DELETE", {})):
            r = await client.request(method, f"/api/workflows/{name}", **kwargs)
            text = await r.text()
            assert r.status in (400, 403), (method, name, r.status, text)
            assert "TOP-SECRET" not in text
    assert json.loads((tmp_path / "outside.json").read_text()) == {"secret": "TOP-SECRET"}
    assert (library / "link.json").is_symlink()
    # the listing never advertises a name that would be refused
    names = [e["name"] for e in await (await client.get("/api/workflows")).json()]
    assert "link.json" not in names and not any(n.startswith("out/") for n in names)


# -- OpenAPI -------------------------------------------------------------------------------------

def _template(path: str) -> str:
    """``/api/workflows/{name:.+}`` -> ``/api/workflows/{}`` (parameter names and patterns aside)."""
    return re.sub(r"\{[^}]*\}", "{}", path)


#: Every route under these is in the OpenAPI document (the rest serve the editors' files).
DOCUMENTED = ("/api/", "/internal/", "/templates/", "/user.css")


def _registered_api_routes(app: Any) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith(DOCUMENTED) and route.method not in ("HEAD", "*"):
            routes.add((route.method.lower(), _template(path)))
    return routes


async def test_openapi_covers_every_api_route(app_and_client: Any) -> None:
    app, client = app_and_client
    r = await client.get("/api/openapi.json")
    assert r.status == 200
    doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    described = {(method, _template(path)) for path, ops in doc["paths"].items() for method in ops}
    registered = _registered_api_routes(app)
    assert len(registered) > 30
    assert registered - described == set(), "routes without an OpenAPI description"
    assert described - registered == set(), "OpenAPI entries for routes that do not exist"


async def test_openapi_document_is_consistent(client: Any) -> None:
    doc = await (await client.get("/api/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs and set(refs) <= set(schemas)
    for path, ops in doc["paths"].items():
        declared_in_path = set(re.findall(r"\{([^}]+)\}", path))
        for method, op in ops.items():
            assert op["summary"] and op["responses"], (method, path)
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == declared_in_path, (method, path)


async def test_no_route_installs_code(app_and_client: Any) -> None:
    """Kiln has no ComfyUI-Manager-style routes: nothing fetches or installs code."""
    app, _ = app_and_client
    words = ("install", "manager", "custom_node", "customnode", "pip", "git", "extension/import", "update")
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = (info.get("path") or info.get("formatter") or "").lower()
        if route.method in ("POST", "PUT", "PATCH"):
            assert not any(w in path for w in words), path


UI_SUB = "0c0c0c0c-0000-4000-8000-000000000001"
UI_DOC = {"version": 0.4, "nodes": [
    {"id": 1, "type": "Number", "mode": 0, "pos": [0, 0], "outputs": [{"name": "value", "type": "FLOAT", "links": [1]}],
     "widgets_values": [3.0]},
    {"id": 2, "type": UI_SUB, "mode": 0, "pos": [100, 0], "inputs": [{"name": "x", "type": "FLOAT", "link": 1}],
     "outputs": [{"name": "text", "type": "STRING", "links": [2]}]},
    {"id": 3, "type": "Show", "mode": 0, "pos": [200, 0], "inputs": [{"name": "text", "type": "STRING", "link": 2}]}],
    "links": [[1, 1, 0, 2, 0, "FLOAT"], [2, 2, 0, 3, 0, "STRING"]],
    "definitions": {"subgraphs": [{"id": UI_SUB, "name": "Describe", "inputs": [{"name": "x", "type": "FLOAT"}],
                                   "outputs": [{"name": "text", "type": "STRING"}],
                                   "nodes": [{"id": 5, "type": "Format", "mode": 0, "pos": [10, 10],
                                              "inputs": [{"name": "value", "type": "FLOAT", "link": 7}],
                                              "outputs": [{"name": "text", "type": "STRING", "links": [8]}]}],
                                   "links": [{"id": 7, "origin_id": -10, "origin_slot": 0, "target_id": 5,
                                              "target_slot": 0, "type": "FLOAT"},
                                             {"id": 8, "origin_id": 5, "origin_slot": 0, "target_id": -20,
                                              "target_slot": 0, "type": "STRING"}]}]}}


async def test_editor_files_convert_on_the_server_the_editor_and_prompt_share_it(client: Any) -> None:
    r = await client.post("/api/convert/comfyui", json=UI_DOC)
    assert r.status == 200
    doc = await r.json()
    assert doc["version"] == 1 and set(doc["nodes"]) == {"1", "2:5", "3"}
    assert doc["nodes"]["2:5"] == {"type": "Format", "inputs": {"value": ["1", 0]}, "ui": {"pos": [110.0, 10.0]}}
    assert doc["nodes"]["3"]["inputs"] == {"text": ["2:5", 0]}
    # /prompt takes the same editor file and runs what the conversion says
    r = await client.post("/prompt", json={"prompt": UI_DOC})
    assert r.status == 200, await r.text()


async def test_conversion_refuses_cycles_and_non_editor_files_with_400(client: Any) -> None:
    looped = json.loads(json.dumps(UI_DOC))
    looped["definitions"]["subgraphs"][0]["nodes"].append({"id": 6, "type": UI_SUB, "mode": 0})
    for path in ("/api/convert/comfyui", "/prompt"):
        body = looped if path.startswith("/api") else {"prompt": looped}
        r = await client.post(path, json=body)
        assert r.status == 400, path
        assert "contains itself" in json.dumps(await r.json())
    r = await client.post("/api/convert/comfyui", json=WORKFLOW)
    assert r.status == 400 and "not a ComfyUI editor workflow" in (await r.json())["error"]["message"]
