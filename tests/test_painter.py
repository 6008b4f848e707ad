"""ComfyUI's Painter node (nodes/painter.py) and the COLOR widget type it brings (engine/types.py).

Real files, the real Executor and the real UI-format converter: the composite and mask against the
formula out = rgb * alpha + base * (1 - alpha) on a painting with partial alpha, the bg_color fill
and its one rule, the painting found as LoadImage finds files (escapes refused), the fingerprint
following the painting's content, a ComfyUI editor document as the templates save it, and
``/object_info`` as ComfyUI's frontend needs it to draw the PAINTER and colour widgets.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import nodes.image
import nodes.painter
from engine import types as T
from engine.context import Environment, NodeError
from engine.executor import Executor
from engine.registry import Registry
from engine.validate import WorkflowInvalid
from engine.workflow import parse
from engine.workflow_ui import to_kiln
from node_call import Called, call


@pytest.fixture(scope="module")
def registry() -> Registry:
    """Painter and the image nodes it is used with (LoadImage, SaveImage, PreviewImage)."""
    found = Registry()
    for module in (nodes.image, nodes.painter):
        found.add_module(module)
    return found


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path / "data")


def painting(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An RGBA painting [h,w,4] uint8 with every alpha level present: opaque, clear and partial."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 255, 0
    return rgba


def save(env: Environment, rgba: np.ndarray, name: str = "painter-3-1787.png", kind: str = "input") -> str:
    path = getattr(env.paths, kind).root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def expected(rgba: np.ndarray, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    px = torch.from_numpy(rgba.astype(np.float32) / 255.0).unsqueeze(0)
    alpha = px[..., 3:]
    return px[..., :3] * alpha + base * (1.0 - alpha), alpha[..., 0]


def test_painting_over_the_first_picture_of_a_base_batch(env):
    rgba = painting(12, 8)
    save(env, rgba)
    base = torch.rand(2, 8, 12, 3, generator=torch.Generator().manual_seed(1))
    rec = Called()
    out, mask = call(nodes.painter.painter, env, rec, image=base, mask="painter-3-1787.png [input]",
                     width=512, height=512, bg_color="#000000")
    want_out, want_mask = expected(rgba, base[:1])
    assert out.shape == (1, 8, 12, 3) and mask.shape == (1, 8, 12)
    assert torch.allclose(out, want_out, atol=1e-6) and torch.allclose(mask, want_mask, atol=1e-6)
    assert torch.equal(out[0, 0, 0], want_out[0, 0, 0]) and torch.allclose(out[0, 0, 1], base[0, 0, 1])
    assert ((mask > 0) & (mask < 1)).any()  # partial alpha is exercised, not only 0 and 1
    (entry,) = rec.ui["images"]  # previewed as PreviewImage does
    assert entry["type"] == "temp" and (env.paths.temp.root / entry["subfolder"] / entry["filename"]).is_file()


def test_painting_over_a_bg_color_fill_of_width_by_height(env):
    rgba = painting(128, 64, seed=2)
    save(env, rgba, "painter/painter-694-1784.png", kind="temp")
    out, mask = call(nodes.painter.painter, env, mask="painter/painter-694-1784.png [temp]",
                     width=128, height=64, bg_color="#FF8000")
    fill = torch.tensor([1.0, 128 / 255, 0.0]).expand(1, 64, 128, 3)
    want_out, want_mask = expected(rgba, fill)
    assert torch.allclose(out, want_out, atol=1e-6) and torch.allclose(mask, want_mask, atol=1e-6)


def test_a_painting_of_another_size_is_resized_with_lanczos(env):
    rgba = painting(20, 10, seed=3)
    save(env, rgba)
    base = torch.rand(1, 16, 24, 3, generator=torch.Generator().manual_seed(4))
    out, mask = call(nodes.painter.painter, env, image=base, mask="painter-3-1787.png", width=64, height=64)
    resized = np.asarray(Image.fromarray(rgba, "RGBA").resize((24, 16), resample=Image.Resampling.LANCZOS))
    want_out, want_mask = expected(resized, base)
    assert out.shape == (1, 16, 24, 3) and mask.shape == (1, 16, 24)
    assert torch.allclose(out, want_out, atol=1e-6) and torch.allclose(mask, want_mask, atol=1e-6)


def test_no_painting_gives_the_base_and_a_zero_mask(env):
    base = torch.rand(3, 6, 5, 3, generator=torch.Generator().manual_seed(5))
    out, mask = call(nodes.painter.painter, env, image=base, mask="", width=64, height=64)
    assert torch.equal(out, base[:1]) and torch.equal(mask, torch.zeros(1, 6, 5))
    out, mask = call(nodes.painter.painter, env, mask="  ", width=64, height=128, bg_color="#102030")
    assert out.shape == (1, 128, 64, 3) and torch.equal(mask, torch.zeros(1, 128, 64))
    assert torch.allclose(out[0, 5, 7], torch.tensor([16, 32, 48]) / 255.0)


@pytest.mark.parametrize("colour", ["#12345", "123456", "#12345g", "red", "#1234567", "#abc"])
def test_a_malformed_bg_color_is_an_error_naming_it(env, colour):
    with pytest.raises(NodeError) as info:
        call(nodes.painter.painter, env, mask="", width=64, height=64, bg_color=colour)
    assert info.value.input_name == "bg_color" and colour in str(info.value)
    assert T.parse_color(colour) is None


def test_the_color_rule_and_its_validation(registry, env):
    assert T.parse_color("#00ff7F") == (0, 255, 127) and T.parse_color("#000000") == (0, 0, 0)
    assert T.parse_color(None) is None and T.parse_color(0x00FF00) is None
    assert T.COLOR in T.WIDGET_TYPES
    doc = {"1": {"type": "Painter", "inputs": {"mask": "", "width": 64, "height": 64, "bg_color": "#00ff"}},
           "2": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}}
    with pytest.raises(WorkflowInvalid) as info:
        Executor(registry, env).run(parse({"version": 1, "nodes": doc}))
    (err,) = info.value.errors
    assert (err.node_id, err.input_name, err.type) == ("1", "bg_color", "invalid_input_type")
    assert "#rrggbb" in err.message


@pytest.mark.parametrize("name", ["../outside.png", "../outside.png [input]", "x/../../outside.png [temp]"])
def test_a_painting_outside_the_folders_is_refused(registry, env, name):
    save(env, painting(8, 8), "../outside.png")  # beside the input folder, so it exists
    with pytest.raises(NodeError) as info:
        call(nodes.painter.painter, env, mask=name, width=64, height=64)
    assert info.value.input_name == "mask"
    doc = {"1": {"type": "Painter", "inputs": {"mask": name}},
           "2": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}}
    with pytest.raises(WorkflowInvalid) as invalid:
        Executor(registry, env).run(parse({"version": 1, "nodes": doc}))
    assert [(e.node_id, e.input_name) for e in invalid.value.errors] == [("1", "mask")]


def test_the_fingerprint_follows_the_paintings_content(registry, env):
    spec = registry.get("Painter")
    path = save(env, painting(8, 8, seed=6))
    inputs = {"mask": "painter-3-1787.png [input]", "width": 64, "height": 64, "bg_color": "#000000"}
    first = spec.fingerprint(env, inputs)
    assert first and first == spec.fingerprint(env, inputs)
    save(env, painting(8, 8, seed=7))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    second = spec.fingerprint(env, inputs)
    assert second != first
    assert spec.fingerprint(env, {**inputs, "mask": ""}) == ""
    # Through the executor: the same painting is reused, a repainted one re-runs.
    doc = {"1": {"type": "Painter", "inputs": inputs},
           "2": {"type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    ex = Executor(registry, env)
    assert "1" in ex.run(parse({"version": 1, "nodes": doc})).executed
    assert ex.run(parse({"version": 1, "nodes": doc})).executed == []  # nothing changed: nothing runs
    save(env, painting(8, 8, seed=8))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 2 * 10**9))
    assert "1" in ex.run(parse({"version": 1, "nodes": doc})).executed


@pytest.mark.parametrize("widgets, with_base", [
    (["painter-3-1787235837607.png [input]", 128, 64, "#204060"], False),
    # Some templates save a fifth value (the frontend's own); it is not an input and is left out.
    (["painter-3-1787235837607.png [input]", 1024, 1024, "#204060", "#000000"], True),
])
def test_a_comfyui_editor_document_with_a_painter_runs(registry, env, widgets, with_base):
    rgba = painting(128, 64, seed=9)
    save(env, rgba, "painter-3-1787235837607.png")
    base_pixels = np.random.default_rng(10).integers(0, 256, size=(64, 128, 3), dtype=np.uint8)
    Image.fromarray(base_pixels, "RGB").save(env.paths.input.root / "base.png")
    links = [[1, 3, 0, 4, 0, "IMAGE"]] + ([[2, 2, 0, 3, 0, "IMAGE"]] if with_base else [])
    nodes_ = [
        {"id": 3, "type": "Painter", "mode": 0, "pos": [0, 0],
         "inputs": [{"name": "image", "type": "IMAGE", "link": 2 if with_base else None}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK", "links": []}],
         "widgets_values": widgets},
        {"id": 4, "type": "SaveImage", "mode": 0, "pos": [400, 0],
         "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [],
         "widgets_values": ["painted"]},
    ]
    if with_base:
        nodes_.append({"id": 2, "type": "LoadImage", "mode": 0, "pos": [-400, 0], "inputs": [],
                       "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]},
                                   {"name": "MASK", "type": "MASK", "links": []}],
                       "widgets_values": ["base.png", "image"]})
    kiln = to_kiln({"version": 0.4, "last_link_id": 2, "links": links, "nodes": nodes_}, registry)
    assert kiln["nodes"]["3"]["inputs"] == {"mask": widgets[0], "width": widgets[1], "height": widgets[2],
                                            "bg_color": "#204060", **({"image": ["2", 0]} if with_base else {})}
    outcome = Executor(registry, env).run(parse(kiln))
    assert outcome.status == "succeeded"
    base = (torch.from_numpy(base_pixels.astype(np.float32) / 255.0).unsqueeze(0) if with_base
            else torch.tensor([32, 64, 96]).expand(1, 64, 128, 3) / 255.0)
    want_out, want_mask = expected(rgba, base)
    assert torch.allclose(outcome.results["3"][0], want_out, atol=1e-6)
    assert torch.allclose(outcome.results["3"][1], want_mask, atol=1e-6)
    (saved,) = outcome.outputs["4"]["images"]
    written = np.asarray(Image.open(env.paths.output.root / saved["subfolder"] / saved["filename"]))
    assert np.array_equal(written, np.clip(np.rint(want_out[0].numpy() * 255), 0, 255).astype(np.uint8))
    assert outcome.outputs["3"]["images"][0]["type"] == "temp"


def test_object_info_matches_comfyuis(registry):
    spec = registry.get("Painter")
    assert spec.signature_mismatches() == []
    info = spec.object_info()
    assert (info["name"], info["display_name"], info["category"]) == ("Painter", "Painter", "image")
    assert info["output"] == ["IMAGE", "MASK"] and info["output_node"] is False
    assert info["input_order"] == {"required": ["mask", "width", "height", "bg_color"], "optional": ["image"]}
    req = info["input"]["required"]
    assert req["mask"] == ["STRING", {"default": "", "tooltip": req["mask"][1]["tooltip"], "socketless": True,
                                      "widgetType": "PAINTER", "image_upload": True}]
    for side in ("width", "height"):
        assert req[side] == ["INT", {"default": 512, "min": 64, "max": 4096, "step": 64, "socketless": True,
                                     "hidden": True}]
    assert req["bg_color"] == ["COLOR", {"default": "#000000"}]
    assert info["input"]["optional"]["image"][0] == "IMAGE"
    assert [i.name for i in spec.widget_order()] == ["mask", "width", "height", "bg_color"]
    # Kiln's own editor gets bg_color as a widget too (drawn as a text field).
    assert {i["name"]: i["widget"] for i in spec.schema()["inputs"]}["bg_color"] is True
