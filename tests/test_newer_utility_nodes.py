"""ComfyUI's newer utility nodes that its current templates use, checked against values worked
out by hand: ResolutionSelector, ManualSigmas, CustomCombo, ImageCompare, SaveImageAdvanced; and
every template use of these and of the nodes in test_newer_schema_nodes.py (ComfyMathExpression,
ResizeImageMaskNode, BatchImagesNode) read as the node expects. Bad inputs fail with errors that
name the input."""
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


class _BrightChecker:
    """A stand-in safety checker: flags every image brighter than mid-grey."""

    name = "bright"

    def flags(self, images) -> list[bool]:
        return [bool(image.mean() > 0.5) for image in images]


def test_image_compare_and_save_image_advanced_pass_through_the_safety_guard(registry, env):
    """Both write through Kiln's writer, so the guard judges each image first: with "drop", a
    flagged image is not written, the rest are stamped, and the drops are listed by side."""
    from node_call import Called
    from nodes import image_outputs
    from nodes.safety.guard import SafetyGuard

    env.output_guard = SafetyGuard(env, "drop", _BrightChecker())
    dark, bright = torch.zeros(1, 8, 8, 3), torch.ones(1, 8, 8, 3)
    record = Called()
    call(image_outputs.image_compare, env, record, image_a=torch.cat([dark, bright]), image_b=bright)
    assert [e["filtered"] for e in record.ui["a_images"]] == [False] and record.ui["b_images"] == []
    assert record.ui["dropped"] == [{"index": 1, "filtered": True, "side": "a"},
                                    {"index": 0, "filtered": True, "side": "b"}]
    assert len(list(env.paths.temp.root.glob("*.png"))) == 1
    record = Called()
    (passed,) = call(image_outputs.save_image_advanced, env, record, images=torch.cat([bright, dark]),
                     filename_prefix="guarded", **{"format": "png", "format.bit_depth": "8-bit",
                                                   "format.input_color_space": "sRGB"})
    assert [e["filtered"] for e in record.ui["images"]] == [False] and torch.equal(passed, dark)
    assert [p.name for p in env.paths.output.root.glob("guarded*.png")] == ["guarded_00001_.png"]


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
    assert info["input_order"]["required"] == ["images", "filename_prefix", "format"]
    kind, body = info["input"]["required"]["format"]  # ComfyUI's v3 DynamicCombo: png brings two widgets
    assert kind == "COMFY_DYNAMICCOMBO_V3" and [o["key"] for o in body["options"]] == ["png", "exr", "avif"]
    assert list(body["options"][0]["inputs"]["required"]) == ["bit_depth", "input_color_space"]
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


# -- On ComfyUI's own templates ---------------------------------------------------------

def _template_nodes(registry, types: set[str]) -> list[tuple[str, str, dict]]:
    """(template, node type, converted inputs) for every node of ``types`` in the current templates."""
    import json
    from pathlib import Path

    import comfyui_workflow_templates_json as package

    from engine.workflow_ui import is_ui_format, to_kiln

    found = []
    for path in sorted((Path(package.__file__).parent / "templates").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not is_ui_format(doc):
            continue
        for node in to_kiln(doc, registry)["nodes"].values():
            if node["type"] in types:
                found.append((path.name, node["type"], node["inputs"]))
    return found


def test_every_template_use_reads_as_its_node_expects(registry, env):
    """Each template's values land on the inputs their option names (no slot slips that a default
    would hide), and every expression the templates hold evaluates."""
    from nodes import math_expression, resize_batch

    found = _template_nodes(registry, {"ResizeImageMaskNode", "SaveImageAdvanced", "ComfyMathExpression",
                                       "ResolutionSelector", "CustomCombo", "ManualSigmas"})
    kinds = {kind for _, kind, _ in found}
    assert kinds == {"ResizeImageMaskNode", "SaveImageAdvanced", "ComfyMathExpression", "ResolutionSelector",
                     "CustomCombo", "ManualSigmas"}
    for name, kind, inputs in found:
        where = f"{name}: {kind} {inputs}"
        if kind == "ResizeImageMaskNode":
            wanted = {f"resize_type.{sub}" for sub in resize_batch.RESIZE_OPTIONS[inputs["resize_type"]]}
            assert wanted - {"resize_type.match"} <= set(inputs), where
            assert set(inputs) <= wanted | {"input", "resize_type", "scale_method"}, where
        elif kind == "SaveImageAdvanced":
            assert (inputs["format"], inputs["format.bit_depth"], inputs["format.input_color_space"]) == \
                ("png", "8-bit", "sRGB"), where
        elif kind == "ComfyMathExpression":
            bound = {letter: 3 for letter in "abcd"}
            assert isinstance(math_expression.evaluate(inputs["expression"], bound), (int, float)), where
        elif kind == "ManualSigmas" and isinstance(inputs.get("sigmas"), str):
            (sigmas,) = call(custom_schedulers.manual_sigmas, env, sigmas=inputs["sigmas"])
            assert len(sigmas) >= 2 and float(sigmas[-1]) == 0.0, where
        elif kind == "ResolutionSelector":
            assert inputs["aspect_ratio"] in newer_utility.ASPECT_RATIOS, where


# -- ComfyNumberConvert -------------------------------------------------------------------

def test_number_convert_declares_comfyuis_multi_typed_input(registry):
    spec = registry.get("ComfyNumberConvert")
    info = spec.object_info("ComfyNumberConvert")
    assert info["input"]["required"]["value"][0] == "INT,FLOAT,STRING,BOOLEAN"
    assert info["output"] == ["FLOAT", "INT"]


@pytest.mark.parametrize("value, expected", [
    (True, (1.0, 1)), (False, (0.0, 0)), (7, (7.0, 7)), (-2.75, (-2.75, -2)),
    (" 42 ", (42.0, 42)), ("3.9", (3.9, 3)), ("-1e3", (-1000.0, -1000)),
    ("12345678901234567891", (float(12345678901234567891), 12345678901234567891)),
])
def test_number_convert_follows_comfyuis_rules(env, value, expected):
    assert call(newer_utility.number_convert, env, value=value) == expected


@pytest.mark.parametrize("value, reason", [
    ("", "empty"), ("twelve", "twelve"), ("inf", "finite"), (float("nan"), "nan"), (10 ** 400, "too large"),
])
def test_number_convert_refuses_what_is_no_number_naming_value(env, value, reason):
    with pytest.raises(NodeError, match=reason) as caught:
        call(newer_utility.number_convert, env, value=value)
    assert caught.value.input_name == "value"


def test_comfyuis_datatype_conversion_template_runs(registry, env):
    """ComfyUI's basic_datatype_conversion template (text -> number -> math -> previews) runs
    from its editor file, with the previews ComfyUI shows for it."""
    import json
    from pathlib import Path

    import comfyui_workflow_templates_json as package

    doc = json.loads((Path(package.__file__).parent / "templates" / "basic_datatype_conversion.json").read_text())
    outcome = Executor(registry, env).run(parse_document(doc, registry))
    assert outcome.status == "succeeded", outcome.error
    convert = next(n["id"] for n in doc["nodes"] if n["type"] == "ComfyNumberConvert")
    targets = {slot: [str(link[3]) for link in doc["links"] if link[1] == convert and link[2] == slot]
               for slot in (0, 1)}
    assert [outcome.outputs[node] for node in targets[0]] == [{"text": ["1.0"]}]  # the text "1" as FLOAT
    previews = [outcome.outputs[node] for node in targets[1] if node in outcome.outputs]
    assert previews == [{"text": ["1"]}]  # ... as INT
    # The INT also drives a math expression ("a"), whose BOOL (1 is true) reaches a preview.
    (math_node,) = [node for node in targets[1] if node not in outcome.outputs]
    (bool_preview,) = [str(link[3]) for link in doc["links"] if str(link[1]) == math_node and link[2] == 2]
    assert outcome.outputs[bool_preview] == {"text": ["True"]}
