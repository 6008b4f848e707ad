"""Lazy inputs in the executor, through ComfyUI's Switch (ComfySwitchNode) on stub nodes.

Claims: only the branch the switch picks runs (a failing or slow branch that is not picked
costs nothing); a failure in the picked branch names the node that failed; branches come
from the cache like any node; a node needed both lazily and directly runs once; jobs run
together (engine.batching) each take their own branch; the schema marks the inputs lazy.
"""
from __future__ import annotations

import threading

import pytest

import stub_nodes as stubs
from engine.batching import BatchItem, run_together
from engine.context import JobInfo
from engine.events import NodesCached, NodeStarted
from engine.executor import Executor
from engine.workflow import parse


@pytest.fixture(autouse=True)
def _reset_stubs():
    stubs.RAN.clear()
    yield


@pytest.fixture
def executor(tmp_path) -> Executor:
    return stubs.switch_executor(tmp_path)


def graph(switch: bool, on_false: dict | None = None, on_true: bool = True, extra: dict | None = None) -> dict:
    """10:Number(1) -> 11:Add(+3) is on_true; 20:Number(5) -> 21:Multiply(x2) is on_false (or
    ``on_false``'s node); 30:Switch -> 31:Format -> 32:Show."""
    nodes = {
        "10": {"type": "Number", "inputs": {"value": 1}},
        "11": {"type": "Add", "inputs": {"a": ["10", 0], "b": 3}},
        "20": {"type": "Number", "inputs": {"value": 5}},
        "21": on_false or {"type": "Multiply", "inputs": {"a": ["20", 0], "b": 2}},
        "30": {"type": "ComfySwitchNode", "inputs": {"switch": switch, "on_false": ["21", 0]}},
        "31": {"type": "Format", "inputs": {"value": ["30", 0]}},
        "32": {"type": "Show", "inputs": {"text": ["31", 0]}},
    }
    if on_true:
        nodes["30"]["inputs"]["on_true"] = ["11", 0]
    nodes.update(extra or {})
    return {"version": 1, "nodes": nodes}


def run(executor, doc, **kw):
    events = []
    outcome = executor.run(parse(doc), on_event=events.append, **kw)
    return outcome, events


def test_only_the_picked_branch_runs(executor):
    on, events = run(executor, graph(True))
    assert on.status == "succeeded" and on.outputs["32"] == {"text": ["4"]}
    assert {"10", "11"} <= set(stubs.RAN) and not {"20", "21"} & set(stubs.RAN)
    started = [e.node_id for e in events if isinstance(e, NodeStarted)]
    assert started.index("11") < started.index("30")  # the branch runs before the switch starts
    stubs.RAN.clear()
    off, _ = run(executor, graph(False))
    assert off.outputs["32"] == {"text": ["10"]}
    assert {"20", "21"} <= set(stubs.RAN) and not {"10", "11"} & set(stubs.RAN)


def test_a_failing_branch_that_is_not_picked_costs_nothing_and_a_picked_one_names_itself(executor):
    failing = {"type": "Fail", "inputs": {"value": ["20", 0]}}
    ok, _ = run(executor, graph(True, on_false=failing))
    assert ok.status == "succeeded"
    bad, _ = run(executor, graph(False, on_false=failing))
    assert bad.status == "failed"
    assert (bad.error.node_id, bad.error.node_type, bad.error.input_name) == ("21", "Fail", "value")


def test_branches_come_from_the_cache_and_run_once(executor):
    run(executor, graph(True))
    run(executor, graph(False))
    stubs.RAN.clear()
    again, events = run(executor, graph(True))  # everything is cached now, the switch's output too
    assert stubs.RAN == [] and again.outputs["32"] == {"text": ["4"]}
    # a change in the branch not picked changes the switch's signature (it keys on both links):
    # the switch runs again, and the picked branch comes from the cache without running
    stubs.RAN.clear()
    doc = graph(False)
    doc["nodes"]["10"]["inputs"]["value"] = 2
    changed, events = run(executor, doc)
    assert changed.outputs["32"] == {"text": ["10"]}
    assert not {"10", "11", "20", "21"} & set(stubs.RAN) and "31" in stubs.RAN
    assert any(isinstance(e, NodesCached) and e.node_ids == ["21"] for e in events)


def test_a_node_needed_directly_and_lazily_runs_once(executor):
    doc = graph(True, extra={"40": {"type": "Format", "inputs": {"value": ["11", 0]}},
                             "41": {"type": "Show", "inputs": {"text": ["40", 0]}}})
    outcome, _ = run(executor, doc)
    assert outcome.status == "succeeded" and stubs.RAN.count("11") == 1
    assert outcome.outputs["41"] == {"text": ["4"]} and outcome.outputs["32"] == {"text": ["4"]}


def test_an_unlinked_pick_falls_back_to_the_other_input(executor):
    outcome, _ = run(executor, graph(True, on_true=False))
    assert outcome.status == "succeeded" and outcome.outputs["32"] == {"text": ["10"]}


def test_jobs_run_together_each_take_their_own_branch(executor):
    plans = [executor.plan(parse(graph(flag))) for flag in (True, False)]
    items = [BatchItem(plan, JobInfo(id=f"job{i}"), lambda e: None, threading.Event())
             for i, plan in enumerate(plans)]
    outcomes = run_together(executor, items)
    assert [o.outputs["32"] for o in outcomes] == [{"text": ["4"]}, {"text": ["10"]}]


def test_the_schema_marks_the_branches_lazy(executor):
    info = executor.registry.object_info()["ComfySwitchNode"]
    assert info["input"]["optional"]["on_true"] == ["*", {"lazy": True}]
    assert info["output"] == ["*"] and info["category"] == "logic"


def test_a_branch_may_be_a_plain_value(executor):
    """ComfyUI's templates feed a switch a promoted widget's text: an any-type input takes a plain
    value as it is (and still refuses what is not one)."""
    doc = graph(False)
    doc["nodes"]["30"]["inputs"]["on_false"] = 7.5
    outcome, _ = run(executor, doc)
    assert outcome.status == "succeeded" and outcome.outputs["32"] == {"text": ["7.5"]}
    from engine.validate import WorkflowInvalid

    doc["nodes"]["30"]["inputs"]["on_false"] = {"not": "a value"}
    with pytest.raises(WorkflowInvalid) as err:
        run(executor, doc)
    assert err.value.errors[0].input_name == "on_false"
