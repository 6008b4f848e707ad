"""ComfyUI's newer nodes built on its newer schema features, checked against values worked out by
hand: ComfyMathExpression (growing inputs values.a..z, a safe evaluator), ResizeImageMaskNode (a
dynamic combo whose choice brings its own inputs) and BatchImagesNode (growing sockets
images.image0..49). Bad inputs fail with errors that name the input. The other newer utility
nodes, and the check over ComfyUI's own templates, are in test_newer_utility_nodes.py."""
from __future__ import annotations

import pytest
import torch

from engine.context import Environment, NodeError
from engine.executor import Executor
from engine.formats import parse_document
from engine.registry import default_registry
from engine.workflow_ui import widget_inputs
from node_call import call


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path)

# -- ComfyMathExpression ----------------------------------------------------------------

def test_math_expression_declares_the_templates_version(registry):
    spec = registry.get("ComfyMathExpression")
    assert spec.signature_mismatches() == []
    info = spec.object_info()
    assert info["input"]["required"]["expression"] == ["STRING", {"default": "a + b", "multiline": True}]
    # ComfyUI's v3 Autogrow: one growing input named a..z, at least one; its sockets are values.a, ...
    assert info["input"]["required"]["values"] == ["COMFY_AUTOGROW_V3", {"template": {
        "input": {"required": {"value": ["FLOAT,INT,BOOLEAN"]}}, "min": 1, "names": list("abcdefghijklmnopqrstuvwxyz")}}]
    assert "optional" not in info["input"] and info["input_order"] == {"required": ["expression", "values"]}
    assert spec.input("values.a").required and not spec.input("values.b").required
    assert info["output"] == ["FLOAT", "INT", "BOOLEAN"] and info["output_name"] == ["FLOAT", "INT", "BOOL"]


def _math(env, expression: str, **values):
    from nodes import math_expression

    return call(math_expression.math_expression, env, expression=expression,
                **{f"values.{k}": v for k, v in values.items()})


@pytest.mark.parametrize("expression, values, expected", [
    ("a", {"a": 7}, (7.0, 7, True)),
    ("a/2", {"a": 5}, (2.5, 2, True)),                              # INT truncates
    ("(a // 32) * 32", {"a": 1000}, (992.0, 992, True)),           # 31 * 32
    ("max(((a + 15) // 16) * 16, 256)", {"a": 100}, (256.0, 256, True)),
    ("max(5, round(a * 24)) + (5 - (max(5, round(a * 24)) % 17)) % 17", {"a": 1.5}, (39.0, 39, True)),  # 36 + 3
    ("a & ~1", {"a": 7}, (6.0, 6, True)),
    ("a & -8", {"a": 1023}, (1016.0, 1016, True)),
    ("a > 2048", {"a": 2048}, (0.0, 0, False)),
    ("a * b + 1", {"a": 3, "b": 0.5}, (2.5, 2, True)),
    ("a % b if b > 0 else 0", {"a": 7, "b": 0}, (0.0, 0, False)),
    ("(a % 4 == 1) and ((b - 1) % 4 == 0)", {"a": 5, "b": 9}, (1.0, 1, True)),
    ("ceil(1.5 * log2(max(a, b))) + 2", {"a": 1024, "b": 3}, (17.0, 17, True)),  # ceil(15) + 2
    ("4 * ceil((a - b * c + c - 1) / 4) + 1", {"a": 97, "b": 2, "c": 8}, (89.0, 89, True)),  # 4 * 22 + 1
    ("sum(values) - 1", {"a": 1, "b": 2, "c": True}, (3.0, 3, True)),
    ("-a / 2", {"a": 3}, (-1.5, -1, True)),                         # int() truncates toward 0
])
def test_math_expression_matches_hand_worked_results(env, expression, values, expected):
    result = _math(env, expression, **values)
    assert result == expected and type(result[0]) is float and type(result[1]) is int


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "a.real", "'text'", "[x for x in values]", "lambda: 1",
    "open('f')", "2 ** 100000", "1 / 0", "q + 1", "", "a +", "max(a, key=abs)", "10 ** 400 * 1.0 ** 0 * 10 ** 400",
    "values", "((10 ** 4000) ** 4000) ** 2", "(10 ** 4000) * (10 ** 4000) * (10 ** 4000) * (10 ** 4000) * (10 ** 4000)",
    "(1 << 4000) << 4000 << 4000 << 4000 << 4000 << 4000 << 4000 << 4000 << 4000 << 4000 << 4000 << 4000 << 4000 "
    "<< 4000 << 4000 << 4000 << 4000", "round(10, -100000000)", "pow(2, 3, 5)",
])
def test_math_expression_refuses_anything_else_naming_expression(env, expression):
    with pytest.raises(NodeError) as err:
        _math(env, expression, a=2)
    assert err.value.input_name == "expression"


def test_math_expression_refuses_a_value_that_is_not_a_number(env):
    with pytest.raises(NodeError) as err:
        _math(env, "a + b", a=1, b="two")
    assert err.value.input_name == "values.b"


def test_math_expression_from_a_template_editor_file(registry, env):
    """Values arrive as values.a, values.b links (the editor file's input names); the expression is
    the only widget value."""
    doc = {"nodes": [{"id": 1, "type": "PrimitiveInt", "mode": 0, "widgets_values": [1000, "fixed"],
                      "outputs": [{"name": "INT", "type": "INT", "links": [1]}]},
                     {"id": 2, "type": "ComfyMathExpression", "mode": 0, "widgets_values": ["(a // 32) * 32"],
                      "inputs": [{"name": "values.a", "type": "FLOAT,INT,BOOLEAN", "link": 1},
                                 {"name": "values.b", "type": "FLOAT,INT,BOOLEAN", "link": None}],
                      "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": []},
                                  {"name": "INT", "type": "INT", "links": [2]},
                                  {"name": "BOOL", "type": "BOOLEAN", "links": []}]},
                     {"id": 3, "type": "PreviewAny", "mode": 0,
                      "inputs": [{"name": "source", "type": "*", "link": 2}]}],
           "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 1, 3, 0, "INT"]]}
    outcome = Executor(registry, env).run(parse_document(doc, registry))
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["3"] == {"text": ["992"]}


# -- ResizeImageMaskNode: a dynamic combo --------------------------------------------------

def _resize(env, x, resize_type: str, method: str = "nearest-exact", **options):
    from nodes import resize_batch

    spec = resize_batch.resize_image_mask
    values = {i.name: i.default for i in spec.inputs if i.name.startswith("resize_type.") and i.default is not None
              and i.name != "resize_type.match"}
    values.update({f"resize_type.{k}": v for k, v in options.items()})
    (out,) = call(spec, env, input=x, resize_type=resize_type, scale_method=method, **values)
    return out


@pytest.mark.parametrize("source, resize_type, options, expected", [
    ((50, 100), "scale dimensions", {"width": 0, "height": 30}, (30, 60)),      # w = round(100 * 30 / 50)
    ((50, 100), "scale dimensions", {"width": 40, "height": 0}, (20, 40)),
    ((7, 10), "scale by multiplier", {"multiplier": 1.5}, (10, 15)),             # 10.5 rounds to even
    ((50, 100), "scale longer dimension", {"longer_size": 64}, (32, 64)),
    ((100, 50), "scale longer dimension", {"longer_size": 64}, (64, 32)),
    ((50, 100), "scale shorter dimension", {"shorter_size": 64}, (64, 128)),
    ((40, 40), "scale shorter dimension", {"shorter_size": 24}, (24, 24)),
    ((50, 100), "scale width", {"width": 30, "height": 999}, (15, 30)),          # the height is not used
    ((50, 100), "scale height", {"height": 10, "width": 999}, (10, 20)),
    # int(0.01 * 2^20) = 10485 pixels: scale sqrt(10485 / 5000) = 1.4481 -> 144.8, 72.4
    ((50, 100), "scale total pixels", {"megapixels": 0.01}, (72, 145)),
    ((20, 30), "scale to multiple", {"multiple": 8}, (16, 24)),
    ((21, 30), "scale to multiple", {"multiple": 8}, (16, 24)),                  # covers 24x17, crops a row
    ((16, 24), "scale to multiple", {"multiple": 8}, (16, 24)),                  # already divides: unchanged
])
def test_resize_image_mask_sizes_match_hand_worked_ones(env, source, resize_type, options, expected):
    image = torch.rand(2, *source, 3)
    assert tuple(_resize(env, image, resize_type, **options).shape) == (2, *expected, 3)
    mask = torch.rand(1, *source)  # a mask stays a mask, [B,H,W]
    assert tuple(_resize(env, mask, resize_type, **options).shape) == (1, *expected)


def test_resize_image_mask_crops_the_centre_and_matches_a_size(env):
    image = torch.zeros(1, 50, 100, 3)
    image[:, :, 25:75] = 1.0  # the centre square is white, the sides black
    assert torch.equal(_resize(env, image, "scale dimensions", width=20, height=20, crop="center"),
                       torch.ones(1, 20, 20, 3))
    stretched = _resize(env, image, "scale dimensions", width=20, height=20, crop="disabled")
    assert stretched[0, 0, 0, 0] == 0 and stretched[0, 0, 10, 0] == 1
    assert _resize(env, image, "scale dimensions", width=0, height=0) is image
    mask = torch.rand(1, 20, 30)
    matched = _resize(env, mask, "match size", match=torch.rand(3, 6, 8, 3), crop="disabled")
    assert tuple(matched.shape) == (1, 6, 8)


def test_resize_image_mask_errors_name_the_input(env):
    with pytest.raises(NodeError) as err:
        _resize(env, torch.rand(1, 8, 8, 3), "match size")
    assert err.value.input_name == "resize_type.match"
    with pytest.raises(NodeError) as err:
        _resize(env, torch.rand(1, 8, 8, 3), "scale longer dimension", longer_size=0)
    assert err.value.input_name == "resize_type"
    with pytest.raises(NodeError) as err:
        _resize(env, torch.rand(8, 8), "scale by multiplier")
    assert err.value.input_name == "input"


def test_the_converter_reads_a_dynamic_combos_option_widgets(registry):
    """An editor file lists the chosen option's widget values right after the combo's; a linked
    sub-input is named resize_type.width in the file's inputs, as in ComfyUI's API form."""
    spec = registry.get("ResizeImageMaskNode")
    assert widget_inputs(["scale dimensions", 640, 360, "center", "lanczos"], spec)[0] == {
        "resize_type": "scale dimensions", "resize_type.width": 640, "resize_type.height": 360,
        "resize_type.crop": "center", "scale_method": "lanczos"}
    assert widget_inputs(["scale total pixels", 1, "lanczos"], spec)[0] == {
        "resize_type": "scale total pixels", "resize_type.megapixels": 1, "scale_method": "lanczos"}
    assert widget_inputs(["match size", "disabled", "bilinear"], spec)[0] == {  # match is a socket, no widget
        "resize_type": "match size", "resize_type.crop": "disabled", "scale_method": "bilinear"}
    assert spec.widget_order()[0].name == "resize_type" and len(spec.widget_order()) == 2
    doc = {"nodes": [{"id": 1, "type": "PrimitiveInt", "mode": 0, "widgets_values": [48, "fixed"],
                      "outputs": [{"name": "INT", "type": "INT", "links": [2]}]},
                     {"id": 2, "type": "ResizeImageMaskNode", "mode": 0,
                      "widgets_values": ["scale dimensions", 512, 512, "center", "area"],
                      "inputs": [{"name": "input", "type": "IMAGE,MASK", "link": None},
                                 {"name": "resize_type.width", "type": "INT",
                                  "widget": {"name": "resize_type.width"}, "link": 2}]}],
           "links": [[2, 1, 0, 2, 1, "INT"]]}
    inputs = parse_document(doc, registry).nodes["2"].inputs
    assert inputs["resize_type.height"] == 512 and inputs["scale_method"] == "area"
    assert (inputs["resize_type.width"].node_id, inputs["resize_type.width"].output) == ("1", 0)


# -- BatchImagesNode: growing inputs ------------------------------------------------------

def test_batch_images_declares_fifty_slots_two_required(registry):
    spec = registry.get("BatchImagesNode")
    info = spec.object_info()
    assert info["input"] == {"required": {"images": ["COMFY_AUTOGROW_V3", {"template": {
        "input": {"required": {"image": ["IMAGE"]}}, "min": 2, "prefix": "image", "max": 50}}]}}
    assert info["output"] == ["IMAGE"]
    # Kiln itself validates and runs the flat sockets, the first two required
    assert [i.name for i in spec.inputs if i.required] == ["images.image0", "images.image1"]
    assert [i.name for i in spec.inputs][-1] == "images.image49" and len(spec.inputs) == 50


def test_batch_images_pads_channels_and_takes_the_first_size(env):
    from nodes import resize_batch

    a = torch.rand(1, 8, 8, 3)
    b = torch.rand(2, 8, 8, 4)
    tall = torch.rand(1, 16, 8, 3)  # centre-cropped to 8x8: rows 4..11, then the same size
    (out,) = call(resize_batch.batch_images, env, **{"images.image0": a, "images.image1": b,
                                                     "images.image3": tall})
    assert tuple(out.shape) == (4, 8, 8, 4)
    assert torch.equal(out[0, ..., :3], a[0]) and torch.equal(out[0, ..., 3], torch.ones(8, 8))
    assert torch.equal(out[1:3], b)
    assert torch.allclose(out[3, ..., :3], tall[0, 4:12], atol=1e-6)
    with pytest.raises(NodeError) as err:
        call(resize_batch.batch_images, env, **{"images.image0": a, "images.image1": torch.rand(8, 8)})
    assert err.value.input_name == "images.image1"


def test_batch_images_in_slot_order_from_an_editor_file(registry, env, tmp_path):
    """The editor file names the sockets images.image0 ..., in any order in its inputs list."""
    from PIL import Image

    for name, shade in (("a.png", 0), ("b.png", 255)):
        Image.new("RGB", (8, 8), (shade, shade, shade)).save(env.paths.input.root / name)
    doc = {"nodes": [{"id": 1, "type": "LoadImage", "mode": 0, "widgets_values": ["a.png", "image"],
                      "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}]},
                     {"id": 2, "type": "LoadImage", "mode": 0, "widgets_values": ["b.png", "image"],
                      "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}]},
                     {"id": 3, "type": "BatchImagesNode", "mode": 0, "widgets_values": [],
                      "inputs": [{"name": "images.image1", "type": "IMAGE", "link": 2},
                                 {"name": "images.image0", "type": "IMAGE", "link": 1},
                                 {"name": "images.image2", "type": "IMAGE", "link": None}],
                      "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [3]}]},
                     {"id": 4, "type": "GetImageSize", "mode": 0, "inputs": [{"name": "image", "type": "IMAGE",
                                                                               "link": 3}]}],
           "links": [[1, 1, 0, 3, 1, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"]]}
    workflow = parse_document(doc, registry)
    outcome = Executor(registry, env).run(workflow, outputs=["3"])
    assert outcome.status == "succeeded", outcome.error
    batch = outcome.results["3"][0]
    assert tuple(batch.shape) == (2, 8, 8, 3) and batch[0].max() == 0 and batch[1].min() == 1


def test_resize_and_batch_in_comfyuis_api_form(registry, env):
    """The API form names the sub-inputs and growing sockets as the editor file does."""
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 0)).save(env.paths.input.root / "in.png")
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
           "2": {"class_type": "ResizeImageMaskNode",
                 "inputs": {"input": ["1", 0], "resize_type": "scale by multiplier", "resize_type.multiplier": 0.5,
                            "scale_method": "area"}},
           "3": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["2", 0], "images.image1": ["1", 0]}},
           "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    outcome = Executor(registry, env).run(parse_document(api, registry))
    assert outcome.status == "succeeded", outcome.error
    assert tuple(outcome.results["2"][0].shape) == (1, 10, 20, 3)
    batch = outcome.results["3"][0]
    assert tuple(batch.shape) == (2, 10, 20, 3) and torch.allclose(batch[1, ..., 0], torch.ones(10, 20))


def test_a_dynamic_combo_must_name_declared_sub_inputs():
    from engine import types as T
    from engine.node import Input, NodeSpec

    combo = Input("mode", T.COMBO, default="a", choices=["a", "b"], dynamic={"a": ("size",), "b": ()})
    with pytest.raises(ValueError, match="mode.size"):
        NodeSpec("Broken", lambda ctx, **kw: (), [combo], [])
    spec = NodeSpec("Fine", lambda ctx, **kw: (), [combo, Input("mode.size", T.INT, default=1, optional=True)], [])
    assert [i.name for i in spec.widget_order()] == ["mode"]
    assert [i.name for i in spec.option_widgets(combo, "a")] == ["mode.size"]
    assert spec.option_widgets(combo, "b") == [] and spec.option_widgets(combo, "zzz") == []
    assert widget_inputs(["b", 7], spec)[0] == {"mode": "b"}  # b brings nothing: 7 is not read as a size
