"""ComfyUI's v3 input specs on Kiln's /object_info (a dynamic combo's options with their sub-inputs,
a growing group's template), folded from Kiln's flat declarations, and the API prompts ComfyUI's
frontend then submits (``resize_type.width``, ``images.image0``) validated and run by a real server."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine import types as T
from engine.node import Grow, Input, Output, define_node
from engine.server.app import make_app
from server_helpers import wait_status


@pytest.fixture
async def srv(aiohttp_client: Any, tmp_path: Path) -> Any:
    (tmp_path / "models").mkdir()
    (tmp_path / "workflows").mkdir()
    client = await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows"))
    client.tmp = tmp_path
    return client


async def test_object_info_gives_resize_type_as_a_dynamic_combo(srv: Any) -> None:
    info = (await (await srv.get("/object_info/ResizeImageMaskNode")).json())["ResizeImageMaskNode"]
    assert info["input_order"] == {"required": ["input", "resize_type", "scale_method"]}
    assert not any("." in name for name in info["input"]["required"]) and "optional" not in info["input"]
    kind, body = info["input"]["required"]["resize_type"]
    assert kind == "COMFY_DYNAMICCOMBO_V3"
    options = {o["key"]: o["inputs"] for o in body["options"]}
    assert list(options) == ["scale dimensions", "scale by multiplier", "scale longer dimension",
                             "scale shorter dimension", "scale width", "scale height", "scale total pixels",
                             "match size", "scale to multiple"]
    dims = options["scale dimensions"]["required"]
    assert list(dims) == ["width", "height", "crop"]
    assert dims["width"][0] == "INT" and dims["width"][1]["default"] == 512 and dims["width"][1]["max"] == 16384
    assert dims["crop"] == [["disabled", "center"], {"default": "center", "tooltip": dims["crop"][1]["tooltip"]}]
    assert options["match size"]["required"]["match"] == ["IMAGE,MASK", {"tooltip": "Take this image's or mask's size"}]
    assert list(options["scale total pixels"]["required"]) == ["megapixels"]
    assert info["input"]["required"]["scale_method"][1]["default"] == "area"


async def test_object_info_gives_growing_groups_as_autogrow(srv: Any) -> None:
    everything = await (await srv.get("/object_info")).json()
    batch = everything["BatchImagesNode"]["input"]
    assert batch == {"required": {"images": ["COMFY_AUTOGROW_V3", {"template": {
        "input": {"required": {"image": ["IMAGE"]}}, "min": 2, "prefix": "image", "max": 50}}]}}
    values = everything["ComfyMathExpression"]["input"]["required"]["values"]
    assert values[0] == "COMFY_AUTOGROW_V3" and values[1]["template"]["names"][:3] == ["a", "b", "c"]
    assert values[1]["template"]["min"] == 1 and "prefix" not in values[1]["template"]
    # no node anywhere lists a flat sub-input or growing socket beside its v3 input
    for name, node in everything.items():
        for section in node["input"].values():
            for key, spec in section.items():
                if spec[0] in ("COMFY_DYNAMICCOMBO_V3", "COMFY_AUTOGROW_V3"):
                    assert not any(k.startswith(key + ".") for s in node["input"].values() for k in s), name


async def test_the_frontends_api_prompt_validates_and_runs(srv: Any) -> None:
    """The names ComfyUI's frontend submits for the chosen option and the linked sockets."""
    Image.new("RGB", (40, 20), (255, 0, 0)).save(srv.tmp / "data" / "input" / "in.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
              "2": {"class_type": "ResizeImageMaskNode",
                    "inputs": {"input": ["1", 0], "resize_type": "scale dimensions", "resize_type.width": 16,
                               "resize_type.height": 12, "resize_type.crop": "center", "scale_method": "area"}},
              "3": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["2", 0], "images.image1": ["2", 0]}},
              "4": {"class_type": "ComfyMathExpression", "inputs": {"expression": "a * 2", "values.a": ["7", 0]}},
              "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "v3"}},
              "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
              "7": {"class_type": "PrimitiveFloat", "inputs": {"value": 3.5}}}
    r = await srv.post("/prompt", json={"prompt": prompt})
    assert r.status == 200, await r.text()
    job = await wait_status(srv, (await r.json())["prompt_id"])
    assert job["status"] == "succeeded", job
    assert job["outputs"]["6"] == {"text": ["7.0"]} and len(job["outputs"]["5"]["images"]) == 2
    with Image.open(srv.tmp / "data" / "output" / "v3_00001_.png") as saved:
        assert saved.size == (16, 12)
    # a growing group's required sockets are still required, named as the frontend names them
    bad = {**prompt, "3": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["2", 0]}}}
    r = await srv.post("/prompt", json={"prompt": bad})
    assert r.status == 400 and "images.image1" in await r.text()


def test_grow_declares_its_sockets_once() -> None:
    grow = Grow("clips", min=1, prefix="clip", count=3)
    inputs = grow.inputs(T.INT, default=1)

    @define_node("Grows", inputs=inputs, outputs=[Output("INT", T.INT)])
    def grows(ctx, **clips):
        return (sum(v for v in clips.values() if v is not None),)

    assert [i.name for i in grows.inputs] == ["clips.clip0", "clips.clip1", "clips.clip2"]
    assert [i.optional for i in grows.inputs] == [False, True, True]
    template = grows.object_info()["input"]["required"]["clips"][1]["template"]
    assert template["input"]["required"]["value"] == ["INT", {"default": 1, "forceInput": True}]
    assert grows.widget_order() == []  # growing sockets are links, never positional widgets
    with pytest.raises(ValueError, match="either a prefix"):
        Grow("x", names=("a",), prefix="p", count=1)
    with pytest.raises(ValueError, match="min 3"):
        Grow("x", min=3, names=("a", "b"))
    with pytest.raises(ValueError, match="Grow.inputs"):
        define_node("Half", inputs=inputs[:1] + inputs[2:])(lambda ctx, **kw: (0,))
    with pytest.raises(ValueError, match="Grow.inputs"):
        define_node("Hand", inputs=[Input("clips.clip0", T.INT, grow=grow)])(lambda ctx, **kw: (0,))


def test_editor_export_lays_out_the_chosen_option_and_used_sockets() -> None:
    """Kiln's editor-format export writes what the frontend builds from the v3 specs: the chosen
    option's widget values right after the combo, only the growing sockets in use; and reads back."""
    from engine.formats import parse_document
    from engine.registry import default_registry
    from engine.workflow_export import to_comfy_ui

    registry = default_registry()
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png", "background": "black"}},
           "2": {"class_type": "ResizeImageMaskNode",
                 "inputs": {"input": ["1", 0], "resize_type": "scale by multiplier", "resize_type.multiplier": 0.5,
                            "scale_method": "bicubic"}},
           "3": {"class_type": "ResizeImageMaskNode",
                 "inputs": {"input": ["1", 0], "resize_type": "match size", "resize_type.match": ["2", 0],
                            "resize_type.crop": "disabled", "scale_method": "area"}},
           "4": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["2", 0], "images.image1": ["3", 0]}}}
    original = parse_document(api, registry)
    doc = to_comfy_ui(original, registry)
    nodes = {str(n["id"]): n for n in doc["nodes"]}
    assert nodes["2"]["widgets_values"] == ["scale by multiplier", 0.5, "bicubic"]
    assert nodes["3"]["widgets_values"] == ["match size", "disabled", "area"]
    assert [s["name"] for s in nodes["3"]["inputs"]] == ["input", "resize_type.match"]
    assert [s["name"] for s in nodes["4"]["inputs"]] == ["images.image0", "images.image1"]
    # LoadImage as ComfyUI's frontend lays it out (file, upload value), then Kiln's own background
    assert nodes["1"]["widgets_values"] == ["in.png", "image", "black"]
    back = parse_document(doc, registry)
    for node_id in ("1", "2", "3", "4"):
        assert back.nodes[node_id].inputs == original.nodes[node_id].inputs, node_id


def test_kiln_s_own_loadimage_input_is_hidden_from_comfyui_clients_who_get_comfyui_s_behaviour() -> None:
    """LoadImage's background is not in /object_info (ComfyUI's frontend would read an editor file's
    upload value into it); a ComfyUI workflow gets "none", ComfyUI's stored colours, a Kiln one white."""
    from engine.formats import parse_document
    from engine.registry import default_registry

    registry = default_registry()
    info = registry.get("LoadImage").object_info()
    assert "background" not in info["input"].get("optional", {}) and "background" not in str(info["input_order"])
    assert [i["name"] for i in registry.get("LoadImage").schema()["inputs"]] == ["image", "background"]  # Kiln's editor
    comfy = parse_document({"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}}, registry)
    assert comfy.nodes["1"].inputs["background"] == "none"
    editor_file = {"nodes": [{"id": 1, "type": "LoadImage", "widgets_values": ["in.png", "image"], "inputs": [],
                              "outputs": [], "mode": 0}], "links": []}
    assert parse_document(editor_file, registry).nodes["1"].inputs == {"image": "in.png", "background": "none"}
    kiln = parse_document({"version": 1, "nodes": {"1": {"type": "LoadImage", "inputs": {"image": "in.png"}}}},
                          registry)
    assert "background" not in kiln.nodes["1"].inputs  # Kiln's default (white) applies
