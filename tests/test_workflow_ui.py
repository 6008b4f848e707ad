"""ComfyUI editor files: the one converter (engine/workflow_ui.py) on hand-made cases.

Each case is the smallest editor file that shows one rule ComfyUI's frontend
applies when it queues a graph: subgraph expansion (nested, with inputs, outputs
and promoted widget values), bypass, mute, seed modes in every saved form, the
upload button's value. The real templates are in test_comfy_templates.py.
"""
from __future__ import annotations

import pytest

import stub_nodes as stubs
from engine.context import Environment
from engine.executor import Executor
from engine.node import Input, Output, define_node
from engine.formats import parse_document as parse
from engine.workflow import Link, WorkflowFormatError
from engine.workflow_ui import MAX_EXPANDED_NODES, MAX_SUBGRAPH_DEPTH, ConversionError, to_kiln


@pytest.fixture(scope="module")
def registry():
    reg = stubs.make_registry()

    @define_node("Seeded", inputs=[Input("a", "FLOAT"), Input("seed", "INT", default=0, control_after_generate=True),
                                   Input("scale", "FLOAT", default=1.0)], outputs=[Output("v", "FLOAT")])
    def seeded(ctx, a, seed, scale):
        return (a * scale + seed,)

    @define_node("Pick", inputs=[Input("name", "COMBO", choices=["a.png", "b.png"], extra={"image_upload": True}),
                                 Input("fill", "COMBO", choices=["white", "black"], default="white")],
                 outputs=[Output("text", "STRING")])
    def pick(ctx, name, fill):
        return (f"{name}/{fill}",)

    @define_node("LateOptional", inputs=[Input("extra", "FLOAT", optional=True), Input("text", "STRING")],
                 outputs=[Output("text", "STRING")])
    def late_optional(ctx, text, extra=None):
        return (text,)

    @define_node("Label", inputs=[Input("value", "FLOAT"), Input("text", "STRING")],
                 outputs=[Output("text", "STRING")])
    def label(ctx, value, text):
        return (f"{text}{value}",)

    for spec in (seeded, pick, late_optional, label):
        reg.add(spec)
    return reg


def run(registry, wf, folder):
    return Executor(registry, Environment.for_folder(folder)).run(wf)


def node(id_, type_, inputs=(), outputs=(), widgets=None, mode=0, **extra):
    raw = {"id": id_, "type": type_, "mode": mode, "pos": [id_ * 10, 0],
           "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs]}
    if widgets is not None:
        raw["widgets_values"] = widgets
    raw.update(extra)
    return raw


def inp(name, type_, link=None, widget=False):
    slot = {"name": name, "type": type_, "link": link}
    if widget:
        slot["widget"] = {"name": name}
    return slot


def out(name, type_, links=()):
    return {"name": name, "type": type_, "links": list(links)}


def doc(nodes, links, subgraphs=()):
    return {"version": 0.4, "nodes": nodes, "links": links, "definitions": {"subgraphs": list(subgraphs)}}


def subgraph(id_, name, nodes, links, inputs=(), outputs=()):
    """A definition: links are objects; the input node is -10, the output node -20."""
    return {"id": id_, "name": name, "nodes": nodes, "inputNode": {"id": -10, "bounding": [0, 0, 10, 10]},
            "outputNode": {"id": -20, "bounding": [500, 0, 10, 10]},
            "inputs": [{"name": n, "type": t} for n, t in inputs],
            "outputs": [{"name": n, "type": t} for n, t in outputs],
            "links": [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3], "target_slot": l[4],
                       "type": l[5]} for l in links]}


# -- widgets -------------------------------------------------------------------------------

def test_seed_modes_in_every_saved_form(registry, tmp_path):
    for saved, mode in (("randomize", "randomize"), ("increment", "increment"), (True, "randomize"),
                        (False, "fixed"), (None, None)):  # None: a mode widget not serialized
        ui = doc([node(1, "Number", outputs=[out("value", "FLOAT", [1])], widgets=[2.0]),
                  node(2, "Seeded", inputs=[inp("a", "FLOAT", 1)], widgets=[0.0, 7, saved, 3.0]),
                  node(3, "Format", inputs=[inp("value", "FLOAT", 2)], outputs=[out("text", "STRING", [3])]),
                  node(4, "Show", inputs=[inp("text", "STRING", 3)])],
                 [[1, 1, 0, 2, 0, "FLOAT"], [2, 2, 0, 3, 0, "FLOAT"], [3, 3, 0, 4, 0, "STRING"]])
        ui["nodes"][1]["outputs"] = [out("v", "FLOAT", [2])]
        wf = parse(ui, registry)
        assert wf.nodes["2"].inputs == {"a": Link("1", 0), "seed": 7, "scale": 3.0}, saved
        assert wf.nodes["2"].ui.get("controls") == ({"seed": mode} if mode else None)
        assert run(registry, wf, tmp_path).outputs["4"] == {"text": ["13"]}


def test_a_boolean_is_a_value_when_there_is_no_slot_for_a_mode(registry):
    """A file without mode values: a boolean that is the next widget's value stays its value."""

    @define_node("SeedFlag", inputs=[Input("seed", "INT", default=0, control_after_generate=True),
                                     Input("flag", "BOOLEAN", default=False)], outputs=[Output("v", "INT")])
    def seed_flag(ctx, seed, flag):
        return (seed,)

    registry.add(seed_flag)
    kiln = to_kiln(doc([node(1, "SeedFlag", widgets=[5, True])], []), registry)
    assert kiln["nodes"]["1"]["inputs"] == {"seed": 5, "flag": True}


def test_upload_button_value_never_lands_in_the_next_input(registry):
    for saved in (["b.png", "image"], ["b.png", {"name": "upload", "type": "button"}], ["b.png", "image", "black"]):
        kiln = to_kiln(doc([node(1, "Pick", widgets=saved)], []), registry)
        expect = {"name": "b.png", **({"fill": "black"} if len(saved) == 3 else {})}
        assert kiln["nodes"]["1"]["inputs"] == expect, saved
    # An empty string for a fixed-choice combo is an unset widget, as a template has it.
    kiln = to_kiln(doc([node(1, "Pick", widgets=["a.png", "image", ""])], []), registry)
    assert kiln["nodes"]["1"]["inputs"] == {"name": "a.png"}


def test_named_widget_values_win_over_positions(registry):
    raw = node(1, "Pick", widgets=["x", "y", "z"])
    raw["widgets_values_named"] = {"name": "a.png", "upload": "image"}
    assert to_kiln(doc([raw], []), registry)["nodes"]["1"]["inputs"] == {"name": "a.png"}
    raw = node(2, "Seeded", widgets=[0, 0, 0])
    raw["widgets_values_named"] = {"a": 1.5, "seed": 9, "control_after_generate": "fixed", "scale": 2.0}
    entry = to_kiln(doc([raw], []), registry)["nodes"]["2"]
    assert entry["inputs"] == {"a": 1.5, "seed": 9, "scale": 2.0} and entry["ui"]["controls"] == {"seed": "fixed"}


def test_widget_order_is_required_then_optional_as_object_info_lists_them(registry):
    kiln = to_kiln(doc([node(1, "LateOptional", widgets=["hello", 0.5])], []), registry)
    assert kiln["nodes"]["1"]["inputs"] == {"text": "hello", "extra": 0.5}
    info = registry.get("LateOptional").object_info()
    assert info["input_order"] == {"required": ["text"], "optional": ["extra"]}


def test_a_widget_converted_to_an_input_takes_the_link(registry):
    ui = doc([node(1, "Number", outputs=[out("value", "FLOAT", [1])], widgets=[4.0]),
              node(2, "Seeded", inputs=[inp("a", "FLOAT", None), inp("scale", "FLOAT", 1, widget=True)],
                   outputs=[out("v", "FLOAT")], widgets=[1.0, 0, "fixed", 9.0])],
             [[1, 1, 0, 2, 1, "FLOAT"]])
    assert parse(ui, registry).nodes["2"].inputs == {"a": 1.0, "seed": 0, "scale": Link("1", 0)}


# -- bypass, mute, reroute, primitives --------------------------------------------------------

def test_bypass_takes_the_input_of_the_wanted_type(registry):
    """A bypassed Label (FLOAT, STRING -> STRING) passes its STRING input on, not the one in its slot."""
    ui = doc([node(1, "Format", inputs=[inp("value", "FLOAT")], outputs=[out("text", "STRING", [2])]),
              node(2, "Label", mode=4, inputs=[inp("value", "FLOAT", None), inp("text", "STRING", 2)],
                   outputs=[out("text", "STRING", [3])], widgets=[0.0, ""]),
              node(3, "Show", inputs=[inp("text", "STRING", 3)])],
             [[2, 1, 0, 2, 1, "STRING"], [3, 2, 0, 3, 0, "STRING"]])
    wf = parse(ui, registry)
    assert set(wf.nodes) == {"1", "3"} and wf.nodes["3"].inputs == {"text": Link("1", 0)}


def test_muted_nodes_vanish_with_the_links_into_them(registry):
    ui = doc([node(1, "Format", mode=2, inputs=[inp("value", "FLOAT")], outputs=[out("text", "STRING", [1])]),
              node(2, "Join", inputs=[inp("a", "STRING", 1, widget=True)], outputs=[out("text", "STRING")],
                   widgets=["kept", "", " "])],
             [[1, 1, 0, 2, 0, "STRING"]])
    wf = parse(ui, registry)
    assert set(wf.nodes) == {"2"} and wf.nodes["2"].inputs == {"a": "kept", "b": "", "sep": " "}


def test_reroute_loop_is_a_clear_error(registry):
    ui = doc([node(1, "Reroute", inputs=[inp("", "*", 2)], outputs=[out("", "*", [1])]),
              node(2, "Reroute", inputs=[inp("", "*", 1)], outputs=[out("", "*", [2, 3])]),
              node(3, "Show", inputs=[inp("text", "STRING", 3)])],
             [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 1, 0, "*"], [3, 2, 0, 3, 0, "STRING"]])
    with pytest.raises(WorkflowFormatError, match="circular connection"):
        parse(ui, registry)


# -- subgraphs -----------------------------------------------------------------------------

SCALE_ID = "5f0c7c4e-0000-4000-8000-000000000001"
OUTER_ID = "5f0c7c4e-0000-4000-8000-000000000002"


def scale_subgraph():
    """(x: FLOAT, scale: FLOAT widget) -> x * scale, and its text (two outputs)."""
    return subgraph(SCALE_ID, "Scale", [
        node(1, "Multiply", inputs=[inp("a", "FLOAT", 11), inp("b", "FLOAT", 12, widget=True)],
             outputs=[out("product", "FLOAT", [13, 14])], widgets=[0.0, 1.0]),
        node(2, "Format", inputs=[inp("value", "FLOAT", 14)], outputs=[out("text", "STRING", [15])]),
    ], [[11, -10, 0, 1, 0, "FLOAT"], [12, -10, 1, 1, 1, "FLOAT"], [13, 1, 0, -20, 0, "FLOAT"],
        [15, 2, 0, -20, 1, "STRING"], [14, 1, 0, 2, 0, "FLOAT"]],
        inputs=[("x", "FLOAT"), ("scale", "FLOAT")], outputs=[("product", "FLOAT"), ("text", "STRING")])


def instance(id_, type_, x_link, widget_values=None, scale_link=None, outs=((), ()), mode=0):
    return node(id_, type_, mode=mode, inputs=[inp("x", "FLOAT", x_link), inp("scale", "FLOAT", scale_link, widget=True)],
                outputs=[out("product", "FLOAT", outs[0]), out("text", "STRING", outs[1])], widgets=widget_values)


def test_subgraph_expands_with_inputs_outputs_and_promoted_widget_values(registry, tmp_path):
    ui = doc([node(1, "Number", outputs=[out("value", "FLOAT", [1])], widgets=[3.0]),
              instance(2, SCALE_ID, 1, [5.0], outs=([], [2])),
              node(3, "Show", inputs=[inp("text", "STRING", 2)])],
             [[1, 1, 0, 2, 0, "FLOAT"], [2, 2, 1, 3, 0, "STRING"]], [scale_subgraph()])
    wf = parse(ui, registry)
    assert set(wf.nodes) == {"1", "2:1", "2:2", "3"}
    assert wf.nodes["2:1"].inputs == {"a": Link("1", 0), "b": 5.0}  # the instance's value for the promoted widget
    assert wf.nodes["3"].inputs == {"text": Link("2:2", 0)}
    assert run(registry, wf, tmp_path).outputs["3"] == {"text": ["15"]}
    # Without stored values (the proxy-widget files) the inner widget keeps its own value.
    ui["nodes"][1]["widgets_values"] = []
    assert parse(ui, registry).nodes["2:1"].inputs["b"] == 1.0
    # A linked instance input wins over any widget value.
    ui["nodes"].append(node(4, "Number", outputs=[out("value", "FLOAT", [4])], widgets=[10.0]))
    ui["links"].append([4, 4, 0, 2, 1, "FLOAT"])
    ui["nodes"][1]["inputs"][1]["link"] = 4
    assert parse(ui, registry).nodes["2:1"].inputs["b"] == Link("4", 0)


def test_nested_subgraphs_carry_values_through_every_level(registry, tmp_path):
    """Outer(x) = Scale(x) inside, whose 'scale' widget is promoted twice; ids nest as 5:7:1."""
    outer = subgraph(OUTER_ID, "Outer", [
        instance(7, SCALE_ID, 21, None, scale_link=22, outs=([23], [])),
    ], [[21, -10, 0, 7, 0, "FLOAT"], [22, -10, 1, 7, 1, "FLOAT"], [23, 7, 0, -20, 0, "FLOAT"]],
        inputs=[("x", "FLOAT"), ("scale", "FLOAT")], outputs=[("product", "FLOAT")])
    ui = doc([node(1, "Number", outputs=[out("value", "FLOAT", [1])], widgets=[2.0]),
              node(5, OUTER_ID, inputs=[inp("x", "FLOAT", 1), inp("scale", "FLOAT", None, widget=True)],
                   outputs=[out("product", "FLOAT", [2])], widgets_values=[4.0]),
              node(6, "Format", inputs=[inp("value", "FLOAT", 2)], outputs=[out("text", "STRING", [3])]),
              node(8, "Show", inputs=[inp("text", "STRING", 3)])],
             [[1, 1, 0, 5, 0, "FLOAT"], [2, 5, 0, 6, 0, "FLOAT"], [3, 6, 0, 8, 0, "STRING"]],
             [scale_subgraph(), outer])
    wf = parse(ui, registry)
    assert set(wf.nodes) == {"1", "5:7:1", "5:7:2", "6", "8"}
    assert wf.nodes["5:7:1"].inputs == {"a": Link("1", 0), "b": 4.0}
    assert wf.nodes["6"].inputs == {"value": Link("5:7:1", 0)}
    assert run(registry, wf, tmp_path).outputs["8"] == {"text": ["8"]}


def test_bypassed_and_muted_instances(registry):
    def graph(mode):
        return doc([node(1, "Number", outputs=[out("value", "FLOAT", [1])], widgets=[3.0]),
                    instance(2, SCALE_ID, 1, [5.0], outs=([2], []), mode=mode),
                    node(3, "Format", inputs=[inp("value", "FLOAT", 2)], outputs=[out("text", "STRING", [3])]),
                    node(4, "Show", inputs=[inp("text", "STRING", 3)])],
                   [[1, 1, 0, 2, 0, "FLOAT"], [2, 2, 0, 3, 0, "FLOAT"], [3, 3, 0, 4, 0, "STRING"]],
                   [scale_subgraph()])

    bypassed = parse(graph(4), registry)
    assert set(bypassed.nodes) == {"1", "3", "4"} and bypassed.nodes["3"].inputs == {"value": Link("1", 0)}
    muted = parse(graph(2), registry)
    assert set(muted.nodes) == {"1", "3", "4"} and muted.nodes["3"].inputs == {}


def test_a_subgraph_that_contains_itself_is_refused(registry):
    a_id, b_id = "aaaaaaaa-0000-4000-8000-000000000000", "bbbbbbbb-0000-4000-8000-000000000000"
    a = subgraph(a_id, "A", [node(1, b_id)], [])
    b = subgraph(b_id, "B", [node(1, a_id)], [])
    with pytest.raises(WorkflowFormatError, match=r"subgraph 'A' .* contains itself: A -> B -> A"):
        parse(doc([node(1, a_id)], [], [a, b]), registry)
    direct = subgraph(a_id, "A", [node(1, a_id)], [])
    with pytest.raises(ConversionError, match="contains itself"):
        to_kiln(doc([node(1, a_id)], [], [direct]), registry)


def test_nesting_past_the_limit_is_refused(registry):
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(MAX_SUBGRAPH_DEPTH + 2)]
    defs = [subgraph(ids[i], f"L{i}", [node(1, ids[i + 1])] if i + 1 < len(ids) else
                     [node(1, "Number", widgets=[1.0])], []) for i in range(len(ids))]
    with pytest.raises(WorkflowFormatError, match=f"deeper than {MAX_SUBGRAPH_DEPTH} levels"):
        parse(doc([node(1, ids[0])], [], defs), registry)
    ok = to_kiln(doc([node(1, ids[2])], [], defs), registry)  # 16 levels of instances: fine
    assert len(next(iter(ok["nodes"])).split(":")) == MAX_SUBGRAPH_DEPTH + 1


def test_exponential_expansion_is_refused_quickly(registry):
    """Ten levels, each using the next level ten times: 10^10 nodes if expanded. Refused fast."""
    import time

    ids = [f"{i:08x}-1111-4000-8000-000000000000" for i in range(10)]
    defs = [subgraph(ids[i], f"L{i}", [node(k, ids[i + 1]) for k in range(1, 11)] if i + 1 < len(ids) else
                     [node(1, "Number", widgets=[1.0])], []) for i in range(len(ids))]
    start = time.monotonic()
    with pytest.raises(ConversionError, match=f"more than {MAX_EXPANDED_NODES} nodes"):
        to_kiln(doc([node(1, ids[0])], [], defs), registry)
    assert time.monotonic() - start < 5


def test_a_missing_definition_is_an_unknown_node_type_not_a_crash(registry):
    from engine.validate import WorkflowInvalid, validate

    wf = parse(doc([node(1, "cccccccc-0000-4000-8000-000000000000")], []), registry)
    with pytest.raises(WorkflowInvalid) as err:
        validate(wf, registry)
    assert any(e.type == "unknown_node_type" for e in err.value.errors)


@pytest.mark.parametrize("values, expected", [
    (["m.png", "alpha", "image"], {"image": "m.png", "channel": "alpha"}),  # current frontend: upload value last
    (["m.png", "image", "red"], {"image": "m.png", "channel": "red"}),  # older files: right after the combo
    (["m.png", "green"], {"image": "m.png", "channel": "green"}),  # no upload value at all
])
def test_an_upload_button_s_value_is_skipped_wherever_the_frontend_put_it(values, expected):
    """ComfyUI's frontend appends the upload button after every widget, so a LoadImageMask file holds
    [file, channel, "image"]; reading the button's value right after the file took "image" for the
    channel, which validation then refused."""
    from engine.formats import parse_document
    from engine.registry import default_registry

    doc = {"nodes": [{"id": 1, "type": "LoadImageMask", "widgets_values": values, "inputs": [], "outputs": [],
                      "mode": 0}], "links": []}
    assert parse_document(doc, default_registry()).nodes["1"].inputs == expected


def test_a_subgraph_input_without_an_instance_slot_gives_sockets_its_inner_widgets_value():
    """ComfyUI's ERNIE template promotes the subgraph's width and height through ``proxyWidgets`` (no
    instance slot for them); its PreviewAny nodes show those inputs. Each gets the value of the inner
    widget the same input feeds (EmptyFlux2LatentImage's), as the frontend gives it; a typed socket
    (not a widget type, not ANY) is left to its link as before."""
    import importlib
    import json
    from pathlib import Path

    from engine.formats import parse_document
    from engine.registry import default_registry

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    doc = json.loads((folder / "image_ernie_image.json").read_text(encoding="utf-8"))
    nodes = parse_document(doc, default_registry()).nodes
    latent = nodes["88:71"].inputs
    assert (nodes["88:92"].inputs["source"], nodes["88:93"].inputs["source"]) == (latent["width"], latent["height"])
    doc = json.loads((folder / "video_wan21_scail2_character_replacement.json").read_text(encoding="utf-8"))
    assert "values.c" not in parse_document(doc, default_registry()).nodes["213:184"].inputs
