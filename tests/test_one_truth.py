"""One truth per rule: the model lists, the submission path, the engine's import graph, code nothing calls."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import networkx as nx
import pytest

from engine.registry import default_registry
from test_cli import kiln as run_kiln
from test_layering import ENGINE, imported_modules


def make_models(root: Path) -> Path:
    ck = root / "checkpoints"
    for name in ("a.safetensors", "b.sft", "c.pt2", "d.ckpt", "sub/e.safetensors", ".hidden.safetensors"):
        (ck / name).parent.mkdir(parents=True, exist_ok=True)
        (ck / name).write_bytes(b"x")
    for pipeline in ("top-diffusers", "family/nested-diffusers"):
        (ck / pipeline / "unet").mkdir(parents=True)
        (ck / pipeline / "model_index.json").write_text("{}")
        (ck / pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (root / "vae" / "vdiff").mkdir(parents=True)
    (root / "vae" / "vdiff" / "config.json").write_text("{}")
    (root / "vae" / "v.safetensors").write_bytes(b"x")
    for folder, name in (("diffusion_models", "new.safetensors"), ("unet", "old.safetensors"),
                         ("text_encoders", "t5.safetensors"), ("clip", "clip_l.safetensors")):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / name).write_bytes(b"x")
    return root


async def test_the_model_routes_offer_exactly_what_the_loaders_accept(aiohttp_client, tmp_path):
    from engine.server.app import make_app

    models = make_models(tmp_path / "models")
    client = await aiohttp_client(make_app(tmp_path / "data", models, tmp_path / "wf", registry=default_registry()))
    schemas = await (await client.get("/api/nodes")).json()
    loader_choices = {
        "checkpoints": next(i for i in schemas["CheckpointLoader"]["inputs"] if i["name"] == "ckpt_name")["choices"],
        "vae": next(i for i in schemas["VAELoader"]["inputs"] if i["name"] == "vae_name")["choices"],
        "unet": next(i for i in schemas["UNETLoader"]["inputs"] if i["name"] == "unet_name")["choices"],
        "clip": next(i for i in schemas["CLIPLoader"]["inputs"] if i["name"] == "clip_name")["choices"],
    }
    # ComfyUI's alias folders: the loader reads both, and so does the route for either name
    loader_choices["diffusion_models"] = loader_choices["unet"]
    loader_choices["text_encoders"] = loader_choices["clip"]
    assert loader_choices["unet"] == ["new.safetensors", "old.safetensors"]
    assert loader_choices["clip"] == ["clip_l.safetensors", "t5.safetensors"]
    assert loader_choices["checkpoints"] == ["a.safetensors", "d.ckpt", "family/nested-diffusers",
                                             "sub/e.safetensors", "top-diffusers"]
    assert loader_choices["vae"] == ["v.safetensors", "vdiff", "pixel_space"]
    # pixel_space names no file (Chroma1-Radiance's pass-through): ComfyUI's VAELoader adds it, its route lists files
    loader_choices["vae"] = loader_choices["vae"][:-1]
    for folder, expected in loader_choices.items():
        for route in (f"/api/models/{folder}", f"/models/{folder}"):
            assert await (await client.get(route)).json() == expected, route


async def test_the_cli_and_the_server_refuse_a_submission_alike(aiohttp_client, tmp_path):
    from engine.server.app import make_app
    from PIL import Image

    doc = {"version": 1, "params": {"w": "2.width"}, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"type": "ImageResize", "inputs": {"image": ["1", 0], "width": 32, "height": 24}},
        "3": {"type": "SaveImage", "inputs": {"images": ["2", 0]}}}}
    (tmp_path / "input").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "input" / "photo.png")
    (tmp_path / "job.json").write_text(json.dumps(doc))
    params = {"2.colour": "red", "nope": "1", "w": "wide"}
    cli = run_kiln("validate", "job.json", "--json", *[f"--set={k}={v}" for k, v in params.items()], cwd=tmp_path)
    assert cli.returncode == 2
    cli_errors = json.loads(cli.stdout)["errors"]

    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf", registry=default_registry())
    Image.new("RGB", (64, 48)).save(tmp_path / "data" / "input" / "photo.png")
    client = await aiohttp_client(app)
    r = await client.post("/api/jobs", json={"workflow": doc, "params": params})
    assert r.status == 400
    server_errors = (await r.json())["errors"]
    shape = lambda errors: sorted(json.dumps([e["type"], e["node_id"], e["input_name"], e["message"]]) for e in errors)  # noqa: E731,E501
    assert shape(cli_errors) == shape(server_errors)
    assert {e["type"] for e in server_errors} == {"unknown_parameter", "invalid_input_type"}
    assert any("node 2 (ImageResize) has no input 'colour'" in e["message"] for e in server_errors)


def test_the_engine_has_no_import_cycles():
    graph = nx.DiGraph()
    for path in ENGINE.rglob("*.py"):
        module = ".".join(path.relative_to(ENGINE.parent).with_suffix("").parts).removesuffix(".__init__")
        for _, name in imported_modules(path):
            if name.startswith("engine.") and name != module:
                graph.add_edge(module, name)
    assert list(nx.simple_cycles(graph)) == []
    assert "engine.workflow_ui" not in graph.successors("engine.workflow")


@pytest.mark.parametrize("module, owner, name", [("engine/executor.py", None, "execute"),
                                                  ("engine/server/hub.py", "Outgoing", "coalescable")])
def test_code_nothing_called_is_gone(module, owner, name):
    tree = ast.parse((ENGINE.parent / module).read_text())
    body = tree.body if owner is None else next(n for n in tree.body if isinstance(n, ast.ClassDef)
                                                 and n.name == owner).body
    assert name not in {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
