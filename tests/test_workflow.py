"""Both workflow formats parse to the same graph; named parameters; round trips."""
from __future__ import annotations

import json

import networkx as nx
import pytest

import stub_nodes as stubs
from engine.validate import validate
from engine.formats import parse_document
from engine.workflow import Link, WorkflowFormatError, parse

KILN = {
    "version": 1,
    "params": {"start": "1.value", "sep": "7.sep"},
    "nodes": {
        "1": {"type": "Number", "inputs": {"value": 2}, "ui": {"pos": [10, 20]}},
        "2": {"type": "Add", "inputs": {"a": ["1", 0], "b": 3}},
        "3": {"type": "Format", "inputs": {"value": ["2", 0]}, "title": "as text"},
        "7": {"type": "Join", "inputs": {"a": ["3", 0], "b": "x", "sep": "-"}},
        "4": {"type": "Show", "inputs": {"text": ["7", 0]}},
    },
}

API = {
    "1": {"class_type": "Number", "inputs": {"value": 2}},
    "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 3}},
    "3": {"class_type": "Format", "inputs": {"value": ["2", 0]}, "_meta": {"title": "as text"}},
    "7": {"class_type": "Join", "inputs": {"a": ["3", 0], "b": "x", "sep": "-"}},
    "4": {"class_type": "Show", "inputs": {"text": ["7", 0]}},
}


def edge_set(wf):
    return {(u, v, k, d["output"]) for u, v, k, d in wf.graph().edges(keys=True, data=True)}


def test_comfyui_api_format_parses_to_the_same_graph_as_kiln_format():
    kiln, api = parse(KILN), parse(API)
    assert (kiln.source_format, api.source_format) == ("kiln", "comfyui-api")
    assert edge_set(kiln) == edge_set(api)
    assert nx.utils.graphs_equal(nx.DiGraph(kiln.graph()), nx.DiGraph(api.graph()))
    for node_id in kiln.nodes:
        assert kiln.nodes[node_id].type == api.nodes[node_id].type
        assert kiln.nodes[node_id].inputs == api.nodes[node_id].inputs
    assert api.nodes["3"].title == "as text"
    # the /prompt body wrapper is accepted too
    assert edge_set(parse({"prompt": API, "client_id": "abc"})) == edge_set(kiln)


def test_value_wrapping_and_links():
    wf = parse({"1": {"class_type": "Join", "inputs": {"a": {"__value__": [1, 2]}, "b": ["5", 0]}}})
    assert wf.nodes["1"].inputs["a"] == [1, 2]
    assert wf.nodes["1"].inputs["b"] == Link("5", 0)
    assert wf.to_api()["1"]["inputs"]["a"] == {"__value__": [1, 2]}


def test_kiln_round_trip_and_api_export_are_stable():
    wf = parse(KILN)
    again = parse(json.loads(json.dumps(wf.to_kiln())))
    assert again.to_kiln() == wf.to_kiln()
    assert parse(wf.to_api()).to_api() == wf.to_api()
    assert again.nodes["1"].ui == {"pos": [10, 20]}
    assert again.params == {"start": ("1", "value"), "sep": ("7", "sep")}


def test_named_parameters_and_node_input_overrides():
    wf = parse(KILN)
    new = wf.with_overrides({"start": 10, "7.b": "y", "sep": ","})
    assert new.nodes["1"].inputs["value"] == 10
    assert new.nodes["7"].inputs["b"] == "y" and new.nodes["7"].inputs["sep"] == ","
    assert wf.nodes["1"].inputs["value"] == 2  # the original is untouched
    with pytest.raises(KeyError) as info:
        wf.with_overrides({"nope": 1, "99.value": 2})
    assert "nope" in str(info.value) and "99.value" in str(info.value)


def test_bad_params_declaration_is_a_validation_error():
    doc = json.loads(json.dumps(KILN))
    doc["params"]["ghost"] = "42.value"
    from engine.validate import WorkflowInvalid

    with pytest.raises(WorkflowInvalid) as info:
        validate(parse(doc), stubs.make_registry())
    assert "ghost" in str(info.value)


@pytest.mark.parametrize("doc,needle", [
    ("not json", "JSON"),
    ([1, 2], "object"),
    ({}, "no nodes"),
    ({"version": 99, "nodes": {}}, "newer"),
    ({"nodes": [], "links": []}, "UI-format"),
])
def test_documents_that_are_not_workflows(doc, needle):
    with pytest.raises(WorkflowFormatError) as info:
        parse(doc)
    assert needle in str(info.value)


def test_nodes_missing_class_type_are_reported_not_raised():
    from engine.validate import WorkflowInvalid

    wf = parse({"1": {"class_type": "Number", "inputs": {}}, "2": {"inputs": {}}})
    with pytest.raises(WorkflowInvalid) as info:
        validate(wf, stubs.make_registry())
    assert any(e.node_id == "2" and "class_type" in e.message for e in info.value.errors)


def test_comfyui_editor_format_converts_with_the_registry(tmp_path):
    """A litegraph file: positional widgets (with a seed-control value), a Reroute,
    a bypassed node, a muted branch, a Primitive and a Note."""
    from engine.node import Input, Output, define_node

    registry = stubs.make_registry()

    @define_node("Seeded", inputs=[Input("a", "FLOAT"), Input("seed", "INT", default=0, control_after_generate=True),
                                   Input("scale", "FLOAT", default=1.0)], outputs=[Output("v", "FLOAT")])
    def seeded(ctx, a, seed, scale):
        return (a * scale + seed,)

    registry.add(seeded)
    ui = {
        "last_node_id": 9, "last_link_id": 9, "version": 0.4,
        "nodes": [
            {"id": 1, "type": "Number", "pos": [0, 0], "mode": 0, "inputs": [],
             "outputs": [{"name": "value", "type": "FLOAT", "links": [1]}], "widgets_values": [2.0]},
            {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "FLOAT", "links": [2]}]},
            {"id": 3, "type": "Seeded", "mode": 0, "pos": {"0": 5, "1": 6},
             "inputs": [{"name": "a", "type": "FLOAT", "link": 2}],
             "outputs": [{"name": "v", "type": "FLOAT", "links": [3]}], "widgets_values": [0.0, 7, "randomize", 3.0]},
            {"id": 4, "type": "Multiply", "mode": 4, "inputs": [{"name": "a", "type": "FLOAT", "link": 3}],
             "outputs": [{"name": "product", "type": "FLOAT", "links": [4]}], "widgets_values": [100.0]},
            {"id": 5, "type": "Format", "mode": 0, "inputs": [{"name": "value", "type": "FLOAT", "link": 4}],
             "outputs": [{"name": "text", "type": "STRING", "links": [5]}]},
            {"id": 6, "type": "Join", "mode": 0,
             "inputs": [{"name": "a", "type": "STRING", "link": 5}, {"name": "b", "type": "STRING", "link": 8,
                                                                     "widget": {"name": "b"}}],
             "outputs": [{"name": "text", "type": "STRING", "links": [6]}], "widgets_values": ["", "", "-"]},
            {"id": 7, "type": "Show", "mode": 0, "inputs": [{"name": "text", "type": "STRING", "link": 6}], "outputs": []},
            {"id": 8, "type": "PrimitiveNode", "mode": 0, "outputs": [{"name": "STRING", "type": "STRING", "links": [8]}],
             "widgets_values": ["prim"]},
            {"id": 9, "type": "Show", "mode": 2, "inputs": [{"name": "text", "type": "STRING", "link": 9}], "outputs": []},
            {"id": 10, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
        ],
        "links": [[1, 1, 0, 2, 0, "FLOAT"], [2, 2, 0, 3, 0, "FLOAT"], [3, 3, 0, 4, 0, "FLOAT"],
                  [4, 4, 0, 5, 0, "FLOAT"], [5, 5, 0, 6, 0, "STRING"], [6, 6, 0, 7, 0, "STRING"],
                  [8, 8, 0, 6, 1, "STRING"], [9, 6, 0, 9, 0, "STRING"]],
    }
    with pytest.raises(WorkflowFormatError):
        parse(ui)
    wf = parse_document(ui, registry)
    assert wf.source_format == "comfyui-ui"
    assert set(wf.nodes) == {"1", "3", "5", "6", "7"}
    assert wf.nodes["3"].inputs == {"a": Link("1", 0), "seed": 7, "scale": 3.0}
    assert wf.nodes["5"].inputs == {"value": Link("3", 0)}  # bypassed Multiply passed through
    assert wf.nodes["6"].inputs == {"a": Link("5", 0), "b": "prim", "sep": "-"}
    assert wf.nodes["3"].ui == {"pos": [5, 6], "controls": {"seed": "randomize"}}

    from engine.context import Environment
    from engine.executor import Executor

    outcome = Executor(registry, Environment.for_folder(tmp_path)).run(wf)
    assert outcome.outputs["7"] == {"text": ["13-prim"]}  # 2*3+7 = 13


def test_one_parameter_may_set_several_inputs():
    doc = dict(KILN, params={"v": ["1.value", "2.b"], "sep": "7.sep"})
    wf = parse(doc)
    assert wf.resolve_param("v") == ("1", "value")
    changed = wf.with_overrides({"v": 9})
    assert changed.nodes["1"].inputs["value"] == 9 and changed.nodes["2"].inputs["b"] == 9
    assert changed.to_kiln()["params"] == {"v": ["1.value", "2.b"], "sep": "7.sep"}
    assert parse(dict(KILN, params={"v": ["1.value", "nope.x"]})).problems


def test_validated_parameter_values_are_recorded_typed_at_every_target():
    """"9" from a command line or form is stored as 9.0 in both inputs a fanned-out parameter sets."""
    wf = parse(dict(KILN, params={"v": ["1.value", "2.b"], "sep": "7.sep"}))
    assert wf.param_targets("v") == [("1", "value"), ("2", "b")]
    assert wf.param_targets("7.b") == [("7", "b")] and wf.param_targets("nope") == []
    plan = validate(wf.with_overrides({"v": "9", "7.b": "y"}), stubs.make_registry())
    assert plan.record_params(["v", "7.b"]) == {"v": 9.0, "7.b": "y"}
    inputs = plan.workflow.to_kiln()["nodes"]
    assert inputs["1"]["inputs"]["value"] == 9.0 and inputs["2"]["inputs"]["b"] == 9.0
    assert isinstance(inputs["2"]["inputs"]["b"], float)
