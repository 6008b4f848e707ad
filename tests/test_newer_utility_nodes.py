"""ComfyUI's newer utility nodes that its current templates use, checked against values worked
out by hand: ResolutionSelector, ManualSigmas, CustomCombo (and the later ones as they land).
Bad inputs fail with errors that name the input."""
from __future__ import annotations

import pytest
import torch

from engine.context import Environment, NodeError
from engine.executor import Executor
from engine.formats import parse_document
from engine.registry import default_registry
from engine.workflow import parse
from engine.workflow_ui import widget_inputs
from node_call import call
from nodes import custom_schedulers, newer_utility


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path)


def run_preview(registry, env, nodes: dict) -> dict:
    outcome = Executor(registry, env).run(parse({"version": 1, "nodes": nodes}))
    assert outcome.status == "succeeded", outcome.error
    return outcome.outputs


# -- ResolutionSelector ------------------------------------------------------------------

def test_resolution_selector_declares_comfyuis_inputs(registry):
    spec = registry.get("ResolutionSelector")
    assert spec is newer_utility.resolution_selector and spec.signature_mismatches() == []
    info = spec.object_info()
    assert info["input_order"]["required"] == ["aspect_ratio", "megapixels", "multiple"]
    ratios, opts = info["input"]["required"]["aspect_ratio"]
    assert ratios[0] == "1:1 (Square)" and len(ratios) == 8 and "21:9 (Ultrawide)" in ratios
    assert opts["default"] == "1:1 (Square)"
    assert info["input"]["required"]["megapixels"][1] == {"default": 1.0, "min": 0.1, "max": 16.0, "step": 0.1,
                                                          "tooltip": spec.input("megapixels").tooltip}
    multiple = info["input"]["required"]["multiple"][1]
    assert (multiple["default"], multiple["min"], multiple["max"], multiple["step"]) == (8, 8, 128, 4)
    assert info["output"] == ["INT", "INT"] and info["output_name"] == ["width", "height"]


@pytest.mark.parametrize("ratio, megapixels, multiple, expected", [
    ("1:1 (Square)", 1.0, 8, (1024, 1024)),           # side 1024 exactly
    ("16:9 (Widescreen)", 1.0, 8, (1368, 768)),       # unit 1024/12: 1365.3/8 = 170.7 -> 171; 768/8 = 96
    ("9:16 (Portrait Widescreen)", 1.0, 8, (768, 1368)),
    ("16:9 (Widescreen)", 0.4, 32, (864, 480)),       # 26.98 -> 27 * 32, 15.18 -> 15 * 32
    ("1:1 (Square)", 2.0, 8, (1448, 1448)),           # 1448.15 / 8 = 181.02 -> 181
    ("21:9 (Ultrawide)", 1.0, 16, (1568, 672)),       # 97.76 -> 98, 41.90 -> 42
    # side 1028 exactly (1028^2 / 2^20 MP): 128.5 multiples of 8 round to even, 128 -> 1024, as ComfyUI's round
    ("1:1 (Square)", 1028 ** 2 / 2 ** 20, 8, (1024, 1024)),
])
def test_resolution_selector_matches_hand_worked_sizes(env, ratio, megapixels, multiple, expected):
    assert call(newer_utility.resolution_selector, env, aspect_ratio=ratio, megapixels=megapixels,
                multiple=multiple) == expected


def test_resolution_selector_refuses_an_unknown_ratio_naming_it(env):
    with pytest.raises(NodeError) as err:
        call(newer_utility.resolution_selector, env, aspect_ratio="5:4", megapixels=1.0, multiple=8)
    assert err.value.input_name == "aspect_ratio"


def test_resolution_selector_from_an_editor_file_with_two_or_three_widgets(registry, env):
    """Older templates store (ratio, megapixels); newer ones add the multiple. The output feeds an
    empty latent's size through the executor."""
    spec = registry.get("ResolutionSelector")
    assert widget_inputs(["16:9 (Widescreen)", 0.4, 32], spec)[0] == {
        "aspect_ratio": "16:9 (Widescreen)", "megapixels": 0.4, "multiple": 32}
    two = {"nodes": [{"id": 1, "type": "ResolutionSelector", "mode": 0, "widgets_values": ["1:1 (Square)", 2],
                      "outputs": [{"name": "width", "type": "INT", "links": [1]},
                                  {"name": "height", "type": "INT", "links": [2]}]},
                     {"id": 2, "type": "PreviewAny", "mode": 0, "widgets_values": [],
                      "inputs": [{"name": "source", "type": "*", "link": 1}]},
                     {"id": 3, "type": "PreviewAny", "mode": 0, "widgets_values": [],
                      "inputs": [{"name": "source", "type": "*", "link": 2}]}],
           "links": [[1, 1, 0, 2, 0, "INT"], [2, 1, 1, 3, 0, "INT"]]}
    workflow = parse_document(two, registry)
    outcome = Executor(registry, env).run(workflow)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["2"] == {"text": ["1448"]} and outcome.outputs["3"] == {"text": ["1448"]}


# -- ManualSigmas -----------------------------------------------------------------------

def test_manual_sigmas_declares_comfyuis_input(registry):
    spec = registry.get("ManualSigmas")
    assert spec is custom_schedulers.manual_sigmas and spec.signature_mismatches() == []
    info = spec.object_info()
    assert info["input"]["required"] == {"sigmas": ["STRING", {"default": "1, 0.5"}]}
    assert info["output"] == ["SIGMAS"]


@pytest.mark.parametrize("text, expected", [
    ("0.909375, 0.725, 0.421875, 0.0", [0.909375, 0.725, 0.421875, 0.0]),
    ("1., 0.99375, 0.9875", [1.0, 0.99375, 0.9875]),   # "1." is the number 1 (the dot is dropped)
    ("0.85, 0.7250, 0.4219, 0", [0.85, 0.725, 0.4219, 0.0]),
    ("1 0.5\n0.1", [1.0, 0.5, 0.1]),                   # spaces and new lines separate too
    ("[14.6, 7.0, .5]", [14.6, 7.0, 0.5]),             # brackets are not numbers; ".5" is
])
def test_manual_sigmas_reads_every_number_in_order(env, text, expected):
    (sigmas,) = call(custom_schedulers.manual_sigmas, env, sigmas=text)
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1
    assert sigmas.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "none, at all", "0..5, 0"])
def test_manual_sigmas_refuses_text_without_a_clean_list_naming_sigmas(env, text):
    with pytest.raises(NodeError) as err:
        call(custom_schedulers.manual_sigmas, env, sigmas=text)
    assert err.value.input_name == "sigmas"


def test_manual_sigmas_feed_split_sigmas(registry, env):
    """The list is a real SIGMAS value: SplitSigmas cuts it where the templates' two-stage runs do."""
    from nodes.samplers.custom import check_sigmas

    (sigmas,) = call(custom_schedulers.manual_sigmas, env,
                     sigmas="1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0")
    assert check_sigmas(sigmas).shape == (9,)
    high, low = call(registry.get("SplitSigmas"), env, sigmas=sigmas, step=5)
    assert high.tolist() == pytest.approx([1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375])
    assert low.tolist() == pytest.approx([0.909375, 0.725, 0.421875, 0.0])


# -- CustomCombo ------------------------------------------------------------------------

def test_custom_combo_declares_comfyuis_combo_and_outputs(registry):
    spec = registry.get("CustomCombo")
    assert spec is newer_utility.custom_combo and spec.signature_mismatches() == []
    info = spec.object_info()
    assert info["input"]["required"] == {"choice": [[]]}
    assert info["output"] == ["STRING", "INT"] and info["output_name"] == ["STRING", "INDEX"]


def test_custom_combo_takes_the_choice_and_index_an_editor_file_stores(registry, env):
    """widgets_values is (choice, index, option1, option2, ..., "") in ComfyUI's editor files; the
    options are the editor's own and are not inputs."""
    doc = {"nodes": [{"id": 5, "type": "CustomCombo", "mode": 0,
                      "widgets_values": ["Default", 1, "Quality", "Default", "Turbo", ""],
                      "inputs": [{"name": "choice", "type": "COMBO", "widget": {"name": "choice"}, "link": None}],
                      "outputs": [{"name": "STRING", "type": "STRING", "links": [1]},
                                  {"name": "INDEX", "type": "INT", "links": [2]}]},
                     {"id": 6, "type": "PreviewAny", "mode": 0, "inputs": [{"name": "source", "type": "*", "link": 1}]},
                     {"id": 7, "type": "PreviewAny", "mode": 0,
                      "inputs": [{"name": "source", "type": "*", "link": 2}]}],
           "links": [[1, 5, 0, 6, 0, "STRING"], [2, 5, 1, 7, 0, "INT"]]}
    workflow = parse_document(doc, registry)
    assert workflow.nodes["5"].inputs == {"choice": "Default", "index": 1}
    outcome = Executor(registry, env).run(workflow)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["6"] == {"text": ["Default"]} and outcome.outputs["7"] == {"text": ["1"]}


def test_custom_combo_in_the_api_form_ignores_the_option_inputs(registry, env):
    """ComfyUI's API form sends option1..N beside choice and index; any text is a valid choice."""
    outputs = run_preview(registry, env, {
        "1": {"type": "CustomCombo", "inputs": {"choice": "my own", "index": 3, "option1": "a", "option2": ""}},
        "2": {"type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "3": {"type": "PreviewAny", "inputs": {"source": ["1", 1]}}})
    assert outputs["2"] == {"text": ["my own"]} and outputs["3"] == {"text": ["3"]}


# -- ImageCompare -----------------------------------------------------------------------

def _pixels(height: int, width: int, seed: int) -> torch.Tensor:
    """An IMAGE whose values are exact multiples of 1/255, so a saved PNG reads back equal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, height, width, 3), generator=g).float() / 255.0


def _read(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def test_image_compare_declares_comfyuis_inputs(registry):
    spec = registry.get("ImageCompare")
    assert spec.signature_mismatches() == [] and spec.output_node and spec.outputs == []
    info = spec.object_info()
    assert info["input"]["optional"] == {"image_a": ["IMAGE"], "image_b": ["IMAGE"]}


def test_image_compare_saves_both_sides_as_temp_previews(registry, env):
    from node_call import Called
    from nodes import image_outputs

    a, b = _pixels(8, 12, 1), torch.cat([_pixels(8, 12, 2), _pixels(8, 12, 3)])
    record = Called()
    assert call(image_outputs.image_compare, env, record, image_a=a, image_b=b) == ()
    assert set(record.ui) == {"a_images", "b_images"}
    assert len(record.ui["a_images"]) == 1 and len(record.ui["b_images"]) == 2
    for entry in record.ui["a_images"] + record.ui["b_images"]:
        assert entry["type"] == "temp" and entry["subfolder"] == ""
    assert torch.equal(_read(env.paths.temp.root / record.ui["a_images"][0]["filename"]), a[0])
    assert torch.equal(_read(env.paths.temp.root / record.ui["b_images"][1]["filename"]), b[1])
    assert list(env.paths.output.root.glob("*.png")) == []  # previews only, nothing kept


def test_image_compare_with_one_side_and_a_bad_image(env):
    from node_call import Called
    from nodes import image_outputs

    record = Called()
    call(image_outputs.image_compare, env, record, image_b=_pixels(4, 4, 5))
    assert record.ui["a_images"] == [] and len(record.ui["b_images"]) == 1
    with pytest.raises(NodeError) as err:
        call(image_outputs.image_compare, env, image_a=torch.zeros(4, 4, 3))
    assert err.value.input_name == "image_a"


# -- SaveImageAdvanced ------------------------------------------------------------------

def _advanced_file(values: list, prefix_link: bool = False) -> dict:
    """A two-node editor file as ComfyUI's templates save it: LoadImage -> SaveImageAdvanced."""
    return {"nodes": [{"id": 1, "type": "LoadImage", "mode": 0, "widgets_values": ["in.png", "image"],
                       "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}]},
                      {"id": 2, "type": "SaveImageAdvanced", "mode": 0, "widgets_values": values,
                       "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
                       "outputs": [{"name": "images", "type": "IMAGE", "links": []}]}],
            "links": [[1, 1, 0, 2, 0, "IMAGE"]]}


def test_save_image_advanced_declares_comfyuis_png_option(registry):
    spec = registry.get("SaveImageAdvanced")
    assert spec.signature_mismatches() == [] and spec.output_node
    info = spec.object_info()
    assert info["input_order"]["required"] == ["images", "filename_prefix", "format", "format.bit_depth",
                                               "format.input_color_space"]
    assert info["input"]["required"]["format"][0] == ["png", "exr", "avif"]
    assert info["input"]["required"]["filename_prefix"][1]["default"] == "ComfyUI"
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["images"]


def test_save_image_advanced_writes_a_template_png_with_the_workflow(registry, env):
    import json

    from PIL import Image

    from engine.context import JobInfo

    image = _pixels(10, 12, 7)
    Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(env.paths.input.root / "in.png")
    workflow = parse_document(_advanced_file(["Kiln_adv", "png", "8-bit", "sRGB"]), registry)
    literals = {k: v for k, v in workflow.nodes["2"].inputs.items() if k != "images"}
    assert literals == {"filename_prefix": "Kiln_adv", "format": "png", "format.bit_depth": "8-bit",
                        "format.input_color_space": "sRGB"}
    job = JobInfo(id="j", workflow=workflow.to_api(), kiln_workflow=workflow.to_kiln())
    outcome = Executor(registry, env).run(workflow, job=job)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["2"]["images"] == [{"filename": "Kiln_adv_00001_.png", "subfolder": "", "type": "output"}]
    saved = env.paths.output.root / "Kiln_adv_00001_.png"
    assert torch.equal(_read(saved), image[0])
    assert json.loads(Image.open(saved).text["prompt"]) == workflow.to_api()
    assert torch.equal(outcome.results["2"][0], outcome.results["1"][0])  # the images pass on

    env.settings.embed_workflow = False  # metadata off: no text chunks at all
    Executor(registry, env).run(workflow, job=job)
    assert Image.open(env.paths.output.root / "Kiln_adv_00002_.png").text == {}


@pytest.mark.parametrize("values, input_name", [
    (["x", "exr", "32-bit float", "linear"], "format"),
    (["x", "avif", "auto", "sRGB"], "format"),
    (["x", "png", "16-bit", "sRGB"], "format.bit_depth"),
    (["x", "png", "8-bit", "HDR"], "format.input_color_space"),
])
def test_save_image_advanced_refuses_what_kiln_cannot_write_naming_the_input(registry, env, values, input_name):
    from engine.validate import WorkflowInvalid, validate

    with pytest.raises(WorkflowInvalid) as info:
        validate(parse_document(_advanced_file(values), registry), registry, env)
    assert [(e.node_id, e.input_name) for e in info.value.errors if e.node_id == "2"] == [("2", input_name)]
    from nodes import image_outputs

    with pytest.raises(NodeError) as err:  # and the node itself, called past validation
        call(image_outputs.save_image_advanced, env, images=_pixels(2, 2, 0), filename_prefix="x",
             **{"format": values[1], "format.bit_depth": values[2], "format.input_color_space": values[3]})
    assert err.value.input_name == input_name


# -- ComfyMathExpression ----------------------------------------------------------------

def test_math_expression_declares_the_templates_version(registry):
    spec = registry.get("ComfyMathExpression")
    assert spec.signature_mismatches() == []
    info = spec.object_info()
    assert info["input"]["required"]["expression"] == ["STRING", {"default": "a + b", "multiline": True}]
    assert info["input"]["required"]["values.a"] == ["FLOAT,INT,BOOLEAN"]
    assert list(info["input"]["optional"]) == [f"values.{c}" for c in "bcdefghijklmnopqrstuvwxyz"]
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
    "values",
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
    info = registry.get("BatchImagesNode").object_info()
    assert list(info["input"]["required"]) == ["images.image0", "images.image1"]
    assert list(info["input"]["optional"]) == [f"images.image{i}" for i in range(2, 50)]
    assert info["output"] == ["IMAGE"]


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
