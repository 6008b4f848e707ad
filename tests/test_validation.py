"""Validation reports every problem at once, each with node id, type and input."""
from __future__ import annotations

import pytest

import stub_nodes as stubs
from engine.validate import WorkflowInvalid, validate
from engine.workflow import parse


@pytest.fixture
def registry():
    return stubs.make_registry()


def errors_of(doc, registry, **kwargs):
    with pytest.raises(WorkflowInvalid) as info:
        validate(parse(doc), registry, **kwargs)
    return info.value.errors


def by_type(errors):
    out = {}
    for e in errors:
        out.setdefault(e.type, []).append(e)
    return out


def test_every_error_type_is_reported_with_node_and_input_all_at_once(registry):
    doc = {"version": 1, "nodes": {
        "1": {"type": "Number", "inputs": {"value": 5000}},                   # bigger than max
        "2": {"type": "Number", "inputs": {"value": -5000}},                  # smaller than min
        "3": {"type": "Add", "inputs": {"b": 1}},                             # required a missing
        "4": {"type": "Add", "inputs": {"a": ["99", 0]}},                     # link to missing node
        "5": {"type": "Add", "inputs": {"a": ["1", 3]}},                      # output index out of range
        "6": {"type": "Format", "inputs": {"value": ["7", 0]}},               # STRING into FLOAT
        "7": {"type": "Join", "inputs": {"a": "x", "sep": "+"}},              # not among choices
        "8": {"type": "Count", "inputs": {"n": "abc"}},                       # not an int
        "9": {"type": "NoSuchNode", "inputs": {}},                            # unknown type
        "10": {"type": "Show", "inputs": {"text": ["6", 0]}},
        "11": {"type": "Add", "inputs": {"a": [1, 2, 3]}},                    # malformed link
    }}
    # Every node a target, so every node runs and every problem stops the run (spare nodes: below).
    errors = errors_of(doc, registry, outputs=list(doc["nodes"]))
    kinds = by_type(errors)
    expect = {
        "value_bigger_than_max": ("1", "Number", "value"),
        "value_smaller_than_min": ("2", "Number", "value"),
        "required_input_missing": ("3", "Add", "a"),
        "return_type_mismatch": ("6", "Format", "value"),
        "value_not_in_list": ("7", "Join", "sep"),
        "invalid_input_type": ("8", "Count", "n"),
        "unknown_node_type": ("9", "NoSuchNode", None),
    }
    for kind, (node_id, node_type, input_name) in expect.items():
        assert kind in kinds, f"{kind} missing from {[str(e) for e in errors]}"
        e = kinds[kind][0]
        assert (e.node_id, e.node_type, e.input_name) == (node_id, node_type, input_name)
        assert e.message
    bad_links = {(e.node_id, e.input_name) for e in kinds["bad_linked_input"]}
    assert bad_links == {("4", "a"), ("5", "a"), ("11", "a")}
    # The messages say what is wrong in words a person understands.
    assert "5000" in kinds["value_bigger_than_max"][0].message and "1000" in kinds["value_bigger_than_max"][0].message
    assert "'+'" in kinds["value_not_in_list"][0].message
    assert "NoSuchNode" in kinds["unknown_node_type"][0].message
    as_dict = kinds["required_input_missing"][0].to_dict()
    assert as_dict["extra_info"]["input_name"] == "a" and as_dict["node_id"] == "3"


def test_a_spare_node_s_problems_are_reported_but_do_not_stop_the_run(registry):
    """ComfyUI runs only what its outputs need, and its templates and users' canvases carry spare, half-wired
    nodes: their problems are reported on the plan; the problems of what runs still all stop it at once."""
    doc = {"nodes": {
        "1": {"type": "Number", "inputs": {"value": 2}},
        "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
        "3": {"type": "Show", "inputs": {"text": ["2", 0]}},
        "4": {"type": "Join", "inputs": {"a": "x", "sep": "+"}},              # spare: not a choice
        "5": {"type": "Add", "inputs": {"b": 1}},                             # spare: required a missing
        "6": {"type": "Add", "inputs": {"a": ["7", 0]}},                      # spare cycle
        "7": {"type": "Add", "inputs": {"a": ["6", 0]}},
    }}
    plan = validate(parse(doc), registry)
    assert plan.order == ["1", "2", "3"]
    ignored = {(e.node_id, e.type) for e in plan.ignored}
    assert {("4", "value_not_in_list"), ("5", "required_input_missing")} <= ignored
    assert any(e.type == "dependency_cycle" for e in plan.ignored)
    # The same problems on nodes an output needs stop it, every one of them reported.
    doc["nodes"]["8"] = {"type": "Show", "inputs": {"text": ["4", 0]}}
    doc["nodes"]["9"] = {"type": "Format", "inputs": {"value": ["5", 0]}}
    doc["nodes"]["10"] = {"type": "Show", "inputs": {"text": ["9", 0]}}
    stopping = {(e.node_id, e.type) for e in errors_of(doc, registry)}
    assert {("4", "value_not_in_list"), ("5", "required_input_missing")} <= stopping
    assert not any(e.type == "dependency_cycle" for e in errors_of(doc, registry))
    # An unknown node type stops the run wherever it is: it might have been the output (ComfyUI's rule too).
    del doc["nodes"]["8"], doc["nodes"]["9"], doc["nodes"]["10"]
    doc["nodes"]["11"] = {"type": "NoSuchNode", "inputs": {}}
    assert [e.node_id for e in errors_of(doc, registry)] == ["11"]


def test_cycle_is_reported(registry):
    doc = {"nodes": {
        "1": {"type": "Add", "inputs": {"a": ["2", 0]}},
        "2": {"type": "Add", "inputs": {"a": ["1", 0]}},
        "3": {"type": "Format", "inputs": {"value": ["2", 0]}},
        "4": {"type": "Show", "inputs": {"text": ["3", 0]}},
    }}
    errors = errors_of(doc, registry)
    cycle = [e for e in errors if e.type == "dependency_cycle"]
    assert len(cycle) == 1
    assert cycle[0].node_id in ("1", "2")
    assert "1" in cycle[0].message and "2" in cycle[0].message


def test_no_output_node_is_reported(registry):
    errors = errors_of({"nodes": {"1": {"type": "Number", "inputs": {"value": 1}}}}, registry)
    assert [e.type for e in errors] == ["prompt_no_outputs"]


def test_coercion_follows_comfyui(registry):
    doc = {"nodes": {
        "1": {"type": "Number", "inputs": {"value": 3}},          # int for FLOAT: fine
        "2": {"type": "Count", "inputs": {"n": "4"}},             # numeric string for INT: fine
        "3": {"type": "Count", "inputs": {"n": 5.0}},             # integral float for INT: fine
        "4": {"type": "Join", "inputs": {"a": 12, "b": "x"}},     # number for STRING: str()
        "5": {"type": "Show", "inputs": {"text": ["4", 0]}},
        "6": {"type": "Number", "inputs": {"value": "0.25"}},
    }}
    plan = validate(parse(doc), registry, outputs=["5"])
    wf = parse(doc)
    plan_all = validate(wf, registry)
    assert plan_all.nodes  # valid
    # defaults are filled in and values coerced
    literals = {n: validate(wf, registry, outputs=[n]).nodes[n].literals for n in ("1", "2", "3", "6")}
    assert literals["1"] == {"value": 3.0} and isinstance(literals["1"]["value"], float)
    assert literals["2"] == {"n": 4} and literals["3"] == {"n": 5}
    assert literals["6"] == {"value": 0.25}
    assert plan.nodes["4"].literals == {"a": "12", "b": "x", "sep": " "}


@pytest.mark.parametrize("value", ["abc", 1.5, True, [1], {"x": 1}])
def test_invalid_int_values_are_rejected(registry, value):
    doc = {"nodes": {"1": {"type": "Count", "inputs": {"n": value}},
                     "2": {"type": "Format", "inputs": {"value": 1}},
                     "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}
    errors = errors_of(doc, registry, outputs=["1", "3"])
    assert {(e.node_id, e.input_name) for e in errors} == {("1", "n")}
    assert errors[0].type in ("invalid_input_type", "bad_linked_input")


def test_literal_given_for_linked_type_is_rejected(registry):
    doc = {"nodes": {"1": {"type": "BlobSize", "inputs": {"blob": "not a blob"}}}}
    errors = errors_of(doc, registry)
    assert [(e.type, e.node_id, e.input_name) for e in errors] == [("invalid_input_type", "1", "blob")]
    assert "link" in errors[0].message


def test_custom_validation_hook_runs_with_environment(tmp_path):
    from engine.context import Environment
    from engine.node import Input, Output, define_node
    from engine.registry import Registry

    @define_node("NeedsFile", output_node=True, inputs=[Input("name", "STRING")],
                 validate=lambda env, inputs: [] if (env.paths.input.root / inputs["name"]).exists()
                 else [("name", f"no file '{inputs['name']}' in the input folder")])
    def needs_file(ctx, name):
        return None

    registry = Registry()
    registry.add(needs_file)
    env = Environment.for_folder(tmp_path)
    errors = errors_of({"nodes": {"1": {"type": "NeedsFile", "inputs": {"name": "a.png"}}}}, registry, env=env)
    assert [(e.type, e.input_name) for e in errors] == [("custom_validation_failed", "name")]
    (env.paths.input.root / "a.png").write_bytes(b"x")
    assert validate(parse({"nodes": {"1": {"type": "NeedsFile", "inputs": {"name": "a.png"}}}}), registry, env)


def test_choices_from_the_environment_and_open_choices(tmp_path):
    """Folder-listed choices are read per environment; open choices leave the verdict to the node's hook."""
    from engine.context import Environment
    from engine.node import Input, define_node
    from engine.registry import Registry

    def files(env):
        return sorted(p.name for p in env.paths.input.root.iterdir())

    @define_node("PickFile", output_node=True, inputs=[Input("name", "COMBO", choices=files)])
    def pick_file(ctx, name):
        return None

    @define_node("PickOrPath", output_node=True, inputs=[Input("name", "COMBO", choices=files, open_choices=True)],
                 validate=lambda env, inputs: [] if inputs["name"].startswith(("/", "a"))
                 else [("name", f"{inputs['name']!r} is neither listed nor a path")])
    def pick_or_path(ctx, name):
        return None

    registry = Registry()
    registry.add(pick_file)
    registry.add(pick_or_path)
    env = Environment.for_folder(tmp_path)
    (env.paths.input.root / "a.png").write_bytes(b"x")

    def doc(node_type, name):
        return {"nodes": {"1": {"type": node_type, "inputs": {"name": name}}}}

    assert registry.schemas(env)["PickFile"]["inputs"][0]["choices"] == ["a.png"]
    assert "open_choices" not in registry.schemas(env)["PickFile"]["inputs"][0]
    assert registry.schemas(env)["PickOrPath"]["inputs"][0]["open_choices"] is True
    assert registry.object_info(env)["PickFile"]["input"]["required"]["name"] == [["a.png"]]
    assert validate(parse(doc("PickFile", "a.png")), registry, env)
    (env.paths.input.root / "b.png").write_bytes(b"x")  # listed at the next validation, no restart
    assert validate(parse(doc("PickFile", "b.png")), registry, env)
    errors = errors_of(doc("PickFile", "/tmp/c.png"), registry, env=env)
    assert [(e.type, e.input_name) for e in errors] == [("value_not_in_list", "name")]
    assert "a.png" in errors[0].message and "b.png" in errors[0].message

    assert validate(parse(doc("PickOrPath", "/tmp/c.png")), registry, env)  # not listed, the hook accepts it
    errors = errors_of(doc("PickOrPath", "c.png"), registry, env=env)
    assert [(e.type, e.input_name) for e in errors] == [("custom_validation_failed", "name")]
