"""The routes ComfyUI's frontend reads, in ComfyUI's shapes, on a real server with the real node library:
users, settings, user data (its workflows/ is Kiln's library), ComfyUI's jobs API beside Kiln's,
model listings (one rule with the loaders), /internal, view_metadata, templates; and their bad input."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.server.app import make_app
from engine.server.state import STATE
from engine.formats import parse_document as parse
from server_helpers import wait_status

REPO = Path(__file__).resolve().parents[1]


def assert_same_graph(ui_doc: dict[str, Any], original: Any, registry: Any) -> None:
    """The editor-format export, read back by Kiln's converter, has every node, link and value.

    (Compared input by input over the original's inputs: the editor format holds a value for
    every widget, so inputs the original left to their defaults come back written out.)
    """
    back = parse(ui_doc, registry)
    assert set(back.nodes) == set(original.nodes)
    for node_id, node in original.nodes.items():
        assert back.nodes[node_id].type == node.type
        for name, value in node.inputs.items():
            assert back.nodes[node_id].inputs.get(name) == value, (node_id, name)


@pytest.fixture
async def srv(aiohttp_client: Any, tmp_path: Path) -> Any:
    models = tmp_path / "models"
    (models / "checkpoints" / "sub").mkdir(parents=True)
    (models / "checkpoints" / "a.safetensors").write_bytes(b"x")
    (models / "checkpoints" / "sub" / "b.ckpt").write_bytes(b"x")
    (models / "checkpoints" / "notes.txt").write_text("not a model")
    (models / "checkpoints" / "pipe").mkdir()
    (models / "checkpoints" / "pipe" / "model_index.json").write_text("{}")
    wf = tmp_path / "workflows"
    wf.mkdir()
    (wf / "img2img.json").write_text((REPO / "workflows" / "img2img.json").read_text())
    app = make_app(tmp_path / "data", models, wf)
    client = await aiohttp_client(app)
    client.tmp = tmp_path
    return client


# -- users and settings -----------------------------------------------------------------------------

async def test_users_and_settings_per_user_in_the_data_folder(srv: Any) -> None:
    assert await (await srv.get("/api/users")).json() == {"storage": "server", "migrated": True}
    assert (await srv.post("/api/users", json={"username": "x"})).status == 400
    assert await (await srv.get("/api/settings")).json() == {}
    assert (await srv.post("/api/settings", json={"Comfy.Locale": "en", "Comfy.A": 1})).status == 200
    assert (await srv.post("/api/settings/Comfy.B", json={"deep": [1, 2]})).status == 200
    assert (await srv.post("/settings", json={"Comfy.A": 2})).status == 200  # merged, not replaced
    settings = await (await srv.get("/api/settings")).json()
    assert settings == {"Comfy.Locale": "en", "Comfy.A": 2, "Comfy.B": {"deep": [1, 2]}}
    assert await (await srv.get("/api/settings/Comfy.B")).json() == {"deep": [1, 2]}
    assert await (await srv.get("/api/settings/Comfy.Unset")).json() is None
    stored = srv.tmp / "data" / "user" / "default" / "comfy.settings.json"
    assert json.loads(stored.read_text()) == settings


async def test_settings_bad_input(srv: Any) -> None:
    for bad_id in ("..%2F..%2Fkiln", "a%2Fb", "..", "x" * 300):
        r = await srv.post(f"/api/settings/{bad_id}", json=1)
        assert r.status in (400, 404), (bad_id, r.status)
        if r.status == 400:
            assert "setting id" in (await r.json())["error"]["message"]
    r = await srv.post("/api/settings", json={"../../etc": 1})
    assert r.status == 400 and "invalid setting id" in (await r.json())["error"]["message"]
    r = await srv.post("/api/settings", data=b'{"a": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                       headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert (await srv.post("/api/settings", json=[1, 2])).status == 400
    assert (await srv.post("/api/settings", data=b"{not json")).status == 400
    assert await (await srv.get("/api/settings")).json() == {}  # nothing stored by any of these


# -- user data ----------------------------------------------------------------------------------------

UI_DOC = {"last_node_id": 1, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
          "extra": {}, "version": 0.4}


async def test_userdata_workflows_are_kilns_library(srv: Any) -> None:
    wf = srv.tmp / "workflows"
    # saved in ComfyUI's frontend -> in Kiln's library
    r = await srv.post("/api/userdata/workflows%2Fmine.json?overwrite=true&full_info=true", data=json.dumps(UI_DOC))
    assert r.status == 200, await r.text()
    info = await r.json()
    assert info["path"] == "workflows/mine.json" and info["size"] > 0
    assert json.loads((wf / "mine.json").read_text()) == UI_DOC
    names = [e["name"] for e in await (await srv.get("/api/workflows")).json()]
    assert "mine.json" in names and "img2img.json" in names
    # Kiln's library -> listed in the frontend's panel; a Kiln-format file reads back in editor format
    listing = await (await srv.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")).json()
    assert {e["path"] for e in listing} == {"mine.json", "img2img.json"}
    doc = await (await srv.get("/api/userdata/workflows%2Fimg2img.json")).json()
    assert isinstance(doc["nodes"], list) and doc["links"]
    registry = srv.server.app[STATE].registry
    original = parse(json.loads((REPO / "workflows" / "img2img.json").read_text()), registry)
    assert_same_graph(doc, original, registry)
    assert json.loads((wf / "img2img.json").read_text()) == json.loads((REPO / "workflows" / "img2img.json").read_text())
    # overwrite=false, move, delete
    r = await srv.post("/api/userdata/workflows%2Fmine.json?overwrite=false", data=b"{}")
    assert r.status == 409
    r = await srv.post("/api/userdata/workflows%2Fmine.json/move/workflows%2Frenamed.json")
    assert r.status == 200 and await r.json() == "workflows/renamed.json"
    assert (wf / "renamed.json").is_file() and not (wf / "mine.json").exists()
    assert (await srv.delete("/api/userdata/workflows%2Frenamed.json")).status == 204
    assert not (wf / "renamed.json").exists()
    assert (await srv.delete("/api/userdata/workflows%2Frenamed.json")).status == 404


async def test_userdata_other_files_v2_listing_and_startup_probes(srv: Any) -> None:
    assert (await srv.post("/api/userdata/notes%2Fa.txt", data=b"hello")).status == 200
    assert (srv.tmp / "data" / "user" / "default" / "notes" / "a.txt").read_bytes() == b"hello"
    assert await (await srv.get("/api/userdata/notes%2Fa.txt")).read() == b"hello"
    root = await (await srv.get("/api/v2/userdata")).json()
    assert {"name": "workflows", "path": "workflows", "type": "directory"} in root
    assert any(e["name"] == "notes" and e["type"] == "directory" for e in root)
    inner = await (await srv.get("/api/v2/userdata?path=notes")).json()
    assert inner[0]["path"] == "notes/a.txt" and inner[0]["size"] == 5
    # what the frontend probes on a fresh server answers (not 404)
    assert (await srv.get("/api/userdata/user.css")).status == 200
    assert await (await srv.get("/api/userdata/comfy.templates.json")).json() == []
    assert await (await srv.get("/api/userdata?dir=subgraphs&recurse=true&split=false&full_info=true")).json() == []
    assert (await srv.get("/user.css")).status == 200


@pytest.mark.parametrize("name", ["..%2F..%2Fkiln.sqlite3", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2Fx.json",
                                  "..%252F..%252Fx", "a%2F..%2F..%2F..%2Fx"])
async def test_userdata_paths_never_leave_their_folder(srv: Any, name: str) -> None:
    for method, path in (("GET", f"/api/userdata/{name}"), ("POST", f"/api/userdata/{name}"),
                         ("DELETE", f"/api/userdata/{name}"), ("GET", f"/api/userdata?dir={name}"),
                         ("POST", f"/api/userdata/workflows%2Fx.json/move/{name}")):
        r = await srv.request(method, path, data=b"{}")
        assert r.status in (400, 403, 404), (method, path, r.status)
    assert not (srv.tmp / "kiln.sqlite3").exists() and not (srv.tmp / "x.json").exists()
    assert (srv.tmp / "data" / "kiln.sqlite3").exists()


async def test_userdata_size_limit(srv: Any) -> None:
    r = await srv.post("/api/userdata/big.bin", data=b"x" * (16 * 1024 * 1024 + 10))
    assert r.status == 413
    assert not (srv.tmp / "data" / "user" / "default" / "big.bin").exists()


# -- the jobs API ---------------------------------------------------------------------------------------

def _save_prompt(name: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "jobs"}}}


async def test_comfyui_jobs_api_and_kilns_side_by_side(srv: Any) -> None:
    inp = srv.tmp / "data" / "input"
    ids = []
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(inp / f"j{i}.png")
        r = await srv.post("/prompt", json={"prompt": _save_prompt(f"j{i}.png"),
                                            "extra_data": {"extra_pnginfo": {"workflow": {"id": f"wf-{i % 2}"}}}})
        ids.append((await r.json())["prompt_id"])
    for job_id in ids:
        await wait_status(srv, job_id)
    comfy = {"Comfy-User": ""}
    # ComfyUI's frontend's two calls
    active = await (await srv.get("/api/jobs?status=in_progress,pending&limit=200&offset=0", headers=comfy)).json()
    assert active == {"jobs": [], "pagination": {"offset": 0, "limit": 200, "total": 0, "has_more": False}}
    done = await (await srv.get("/api/jobs?status=completed,failed,cancelled&limit=2&offset=0",
                                headers=comfy)).json()
    assert done["pagination"] == {"offset": 0, "limit": 2, "total": 3, "has_more": True}
    first = done["jobs"][0]
    assert first["id"] == ids[-1] and first["status"] == "completed"  # newest first
    assert first["outputs_count"] == 1 and first["preview_output"]["nodeId"] == "2"
    assert first["preview_output"]["mediaType"] == "images" and first["workflow_id"] == "wf-0"
    assert first["execution_end_time"] >= first["execution_start_time"] >= first["create_time"] - 1000
    page2 = await (await srv.get("/api/jobs?status=completed&limit=2&offset=2", headers=comfy)).json()
    assert [j["id"] for j in page2["jobs"]] == [ids[0]] and page2["pagination"]["has_more"] is False
    asc = await (await srv.get("/api/jobs?sort_order=asc")).json()  # a ComfyUI-only parameter alone picks it
    assert [j["id"] for j in asc["jobs"]] == ids
    by_wf = await (await srv.get("/api/jobs?workflow_id=wf-1")).json()
    assert [j["id"] for j in by_wf["jobs"]] == [ids[1]]
    detail = await (await srv.get(f"/api/jobs/{ids[0]}", headers=comfy)).json()
    assert detail["status"] == "completed" and detail["outputs"]["2"]["images"][0]["type"] == "output"
    assert detail["workflow"]["prompt"]["1"]["class_type"] == "LoadImage"
    assert detail["execution_status"]["status_str"] == "success"
    # Kiln's shape: the same paths without ComfyUI's marks, and always under /api/v1
    kiln = await (await srv.get("/api/jobs")).json()
    assert kiln["total"] == 3 and kiln["jobs"][0]["status"] == "succeeded" and "pagination" not in kiln
    assert (await (await srv.get(f"/api/jobs/{ids[0]}")).json())["status"] == "succeeded"
    assert (await (await srv.get(f"/api/v1/jobs/{ids[0]}", headers=comfy)).json())["status"] == "succeeded"
    assert (await (await srv.get("/api/v1/jobs?status=succeeded")).json())["total"] == 3
    assert (await (await srv.get("/api/v1/history")).json())["total"] == 3
    # cancelling: finished jobs are a no-op in ComfyUI's API, a 409 in Kiln's
    r = await srv.post(f"/api/jobs/{ids[0]}/cancel", headers=comfy)
    assert r.status == 200 and await r.json() == {"cancelled": False}
    assert (await srv.post(f"/api/jobs/{ids[0]}/cancel")).status == 409
    r = await srv.post("/api/jobs/cancel", json={"job_ids": [ids[0], "unknown"]})
    assert await r.json() == {"cancelled": False}
    # bad input
    r = await srv.get("/api/jobs?status=pending,bogus", headers=comfy)
    assert r.status == 400 and "Invalid status value(s): bogus" in (await r.json())["error"]
    for query in ("sort_by=size", "sort_order=up", "limit=0", "limit=x", "offset=y"):
        assert (await srv.get(f"/api/jobs?{query}", headers=comfy)).status == 400, query
    assert (await srv.get("/api/jobs/nope", headers=comfy)).status == 404
    assert (await srv.post("/api/jobs/cancel", json={"job_ids": "x"})).status == 400
    assert (await srv.post("/api/jobs/cancel", json={"job_ids": [{"a": 1}]})).status == 400


# -- models, files, logs, metadata --------------------------------------------------------------------

async def test_model_listings_are_the_loaders_own(srv: Any) -> None:
    names = await (await srv.get("/api/models/checkpoints")).json()
    assert names == ["a.safetensors", "pipe", "sub/b.ckpt"]
    info = await (await srv.get("/object_info/CheckpointLoaderSimple")).json()
    choices = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert choices == names
    assert await (await srv.get("/models/checkpoints")).json() == names
    entries = await (await srv.get("/api/experiment/models/checkpoints")).json()
    assert [e["name"] for e in entries] == names and all(e["pathIndex"] == 0 for e in entries)
    folders = await (await srv.get("/api/models")).json()
    assert {"checkpoints", "vae", "embeddings"} <= set(folders)  # every folder read, present or not
    exp = await (await srv.get("/api/experiment/models")).json()
    assert [f["name"] for f in exp] == folders
    paths = await (await srv.get("/internal/folder_paths")).json()
    assert paths["checkpoints"] == [str(srv.tmp / "models" / "checkpoints")]
    assert await (await srv.get("/api/experiment/models/vae")).json() == []
    for bad in ("nothing", "..%2F..", "%2Fetc"):
        assert (await srv.get(f"/api/experiment/models/{bad}")).status in (400, 403, 404)
    assert (await srv.get("/api/experiment/models/preview/checkpoints/0/a.safetensors")).status == 404


async def test_view_metadata_reads_only_a_listed_safetensors_header(srv: Any) -> None:
    header = json.dumps({"__metadata__": {"ss_network_dim": "8"}}).encode()
    (srv.tmp / "models" / "checkpoints" / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    r = await srv.get("/api/view_metadata/checkpoints?filename=m.safetensors")
    assert r.status == 200 and await r.json() == {"ss_network_dim": "8"}
    assert (await srv.get("/view_metadata/checkpoints?filename=a.safetensors")).status == 404  # not a header
    assert (await srv.get("/api/view_metadata/checkpoints?filename=sub/b.ckpt")).status == 404
    for bad in ("..%2F..%2Fx.safetensors", "%2Fetc%2Fx.safetensors"):
        assert (await srv.get(f"/api/view_metadata/checkpoints?filename={bad}")).status in (403, 404)
    assert (await srv.get("/api/view_metadata/..?filename=m.safetensors")).status in (400, 403, 404)


async def test_internal_files_and_logs(srv: Any) -> None:
    inp = srv.tmp / "data" / "input"
    Image.new("RGB", (4, 4)).save(inp / "old.png")
    Image.new("RGB", (4, 4)).save(inp / "new.png")
    import os
    os.utime(inp / "old.png", (1, 1))
    assert await (await srv.get("/internal/files/input")).json() == ["new.png", "old.png"]
    assert (await srv.get("/internal/files/models")).status == 400
    import logging
    logging.getLogger("kiln.test").warning("a line for the terminal panel")
    assert "a line for the terminal panel" in await (await srv.get("/internal/logs")).json()
    raw = await (await srv.get("/internal/logs/raw")).json()
    assert any("terminal panel" in e["m"] for e in raw["entries"]) and raw["size"]["cols"] > 0
    assert (await srv.patch("/internal/logs/subscribe", json={"clientId": "x", "enabled": True})).status == 200


# -- templates, i18n ---------------------------------------------------------------------------------

async def test_templates_are_kilns_shipped_workflows(srv: Any) -> None:
    index = await (await srv.get("/templates/index.json")).json()
    assert index[0]["moduleName"] == "default"
    names = {t["name"] for t in index[0]["templates"]}
    assert {"img2img", "txt2img"} <= names
    registry = srv.server.app[STATE].registry
    for name in names:
        doc = await (await srv.get(f"/templates/{name}.json")).json()
        original = parse(json.loads((REPO / "workflows" / f"{name}.json").read_text()), registry)
        assert_same_graph(doc, original, registry)
        r = await srv.get(f"/templates/{name}-1.png")
        assert r.status == 200 and r.content_type == "image/png"
        with Image.open(io.BytesIO(await r.read())) as im:
            assert im.size == (512, 384) and len(set(im.getdata())) > 3  # a drawing, not a blank
    assert await (await srv.get("/templates/index_logo.json")).json() == {}
    for bad in ("nope.json", "..%2F..%2Fpyproject.toml", "img2img-2.png"):
        assert (await srv.get(f"/templates/{bad}")).status == 404
    assert await (await srv.get("/api/workflow_templates")).json() == {}
    assert await (await srv.get("/api/i18n")).json() == {}
    assert await (await srv.get("/api/global_subgraphs")).json() == {}


def test_frontend_missing_says_how_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['comfyui_frontend_package'] = None\n"
            "from engine.cli import main\n"
            f"sys.exit(main(['serve', '--port', '0', '--data', {str(tmp_path)!r}, '--frontend', 'comfyui']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "pip install 'comfyui-frontend-package==1.58.1'" in run.stderr
