"""Keeping going past a failing node (``keep_going``, make's -k), on stub nodes.

Claims: a failure skips exactly the nodes that need its result, every independent branch
runs and keeps its outputs, and the job still ends failed naming every failure and what
they blocked; branches served from the cache are kept; a lazy input that asks for a
failed branch skips the asking node without a second failure; jobs run together keep
going each on their own; without the flag the first failure ends the job as before.
"""
from __future__ import annotations

import threading

import pytest

import stub_nodes as stubs
from engine.batching import BatchItem, run_together
from engine.context import JobInfo
from engine.events import JobFailed, NodeFailed
from engine.executor import Executor
from engine.workflow import parse


@pytest.fixture(autouse=True)
def _reset_stubs():
    stubs.RAN.clear()
    yield


@pytest.fixture
def executor(tmp_path) -> Executor:
    return stubs.switch_executor(tmp_path)


def three_branches(fail_b: bool = True, fail_c: bool = False) -> dict:
    """1:Number(2) feeds three chains: A 2:Add(+1) -> 3:Format -> 4:Show ("3"); B 5 -> 6:Format -> 7:Show;
    C 8 -> 9:Format -> 11:Show; 10:Join reads A and B -> 12:Show. 5 and 8 are Add(+0) ("2"), or Fail."""
    def first(fail):
        return {"type": "Fail", "inputs": {"value": ["1", 0]}} if fail else {"type": "Add", "inputs": {"a": ["1", 0]}}

    return {"version": 1, "nodes": {
        "1": {"type": "Number", "inputs": {"value": 2}},
        "2": {"type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
        "3": {"type": "Format", "inputs": {"value": ["2", 0]}},
        "4": {"type": "Show", "inputs": {"text": ["3", 0]}},
        "5": first(fail_b),
        "6": {"type": "Format", "inputs": {"value": ["5", 0]}},
        "7": {"type": "Show", "inputs": {"text": ["6", 0]}},
        "8": first(fail_c),
        "9": {"type": "Format", "inputs": {"value": ["8", 0]}},
        "11": {"type": "Show", "inputs": {"text": ["9", 0]}},
        "10": {"type": "Join", "inputs": {"a": ["3", 0], "b": ["6", 0]}},
        "12": {"type": "Show", "inputs": {"text": ["10", 0]}},
    }}


def run(executor, doc, **kw):
    events = []
    outcome = executor.run(parse(doc), on_event=events.append, **kw)
    return outcome, events


def test_without_keep_going_the_first_failure_ends_the_job(executor):
    outcome, events = run(executor, three_branches())
    assert outcome.status == "failed" and outcome.error.node_id == "5"
    assert not any(isinstance(e, NodeFailed) for e in events)
    assert outcome.error.failures == [{"node_id": "5", "node_type": "Fail", "input_name": "value",
                                       "message": outcome.error.message, "exception_type": "NodeError"}]
    order = executor.plan(parse(three_branches())).order
    assert stubs.RAN[-1] == "5" and all(order.index(n) < order.index("5") for n in stubs.RAN[:-1])
    assert order.index("5") < len(order) - 1  # so some node after it would have run: nothing did


def test_keep_going_runs_every_independent_branch_and_names_the_failure(executor):
    outcome, events = run(executor, three_branches(), keep_going=True)
    assert outcome.status == "failed"
    assert {"2", "3", "4", "8", "9", "11"} <= set(stubs.RAN) and not {"6", "7", "10", "12"} & set(stubs.RAN)
    assert outcome.outputs["4"] == {"text": ["3"]} and outcome.outputs["11"] == {"text": ["2"]}
    assert "7" not in outcome.outputs
    failed = [e for e in events if isinstance(e, NodeFailed)]
    assert [(e.node_id, e.input_name, sorted(e.blocked)) for e in failed] == [("5", "value", ["10", "12", "6", "7"])]
    end = events[-1]
    assert isinstance(end, JobFailed) and end is outcome.error
    assert (end.node_id, end.node_type, [f["node_id"] for f in end.failures]) == ("5", "Fail", ["5"])
    assert sorted(end.blocked) == ["10", "12", "6", "7"] and "4" in end.executed and "5" not in end.executed


def test_two_failures_are_both_named_in_the_order_they_happened(executor):
    outcome, events = run(executor, three_branches(fail_b=True, fail_c=True), keep_going=True)
    order = [e.node_id for e in events if isinstance(e, NodeFailed)]
    assert sorted(order) == ["5", "8"] and [f["node_id"] for f in outcome.error.failures] == order
    assert outcome.error.node_id == order[0]
    assert outcome.outputs == {"4": {"text": ["3"]}}
    assert sorted(outcome.error.blocked) == ["10", "11", "12", "6", "7", "9"]


def test_a_keep_going_job_that_fails_nowhere_succeeds_and_the_failures_are_not_cached(executor):
    ok, _ = run(executor, three_branches(fail_b=False), keep_going=True)
    assert ok.status == "succeeded" and ok.outputs["7"] == {"text": ["2"]}
    run(executor, three_branches(), keep_going=True)
    stubs.RAN.clear()
    again, _ = run(executor, three_branches(), keep_going=True)  # the failed node runs (and fails) again
    assert again.status == "failed" and stubs.RAN == ["5"]


def test_branches_served_from_the_cache_are_kept_beside_a_failure(executor):
    """A and C come from the cache of an earlier run; B's first node now fails: 10 (reading A's
    cached 3 and B's 6) is blocked, A's and C's outputs are served."""
    run(executor, three_branches(fail_b=False))
    stubs.RAN.clear()
    outcome, _ = run(executor, three_branches(), keep_going=True)
    assert stubs.RAN == ["5"]
    assert outcome.outputs["4"] == {"text": ["3"]} and outcome.outputs["11"] == {"text": ["2"]}
    assert sorted(outcome.error.blocked) == ["10", "12", "6", "7"]


def switch_over_a_failing_branch() -> dict:
    """30:Switch(switch=False) lazily reads 21:Fail; 40 -> 41 is independent of it."""
    return {"version": 1, "nodes": {
        "10": {"type": "Number", "inputs": {"value": 1}},
        "20": {"type": "Number", "inputs": {"value": 5}},
        "21": {"type": "Fail", "inputs": {"value": ["20", 0]}},
        "30": {"type": "ComfySwitchNode", "inputs": {"switch": False, "on_false": ["21", 0], "on_true": ["10", 0]}},
        "31": {"type": "Format", "inputs": {"value": ["30", 0]}},
        "32": {"type": "Show", "inputs": {"text": ["31", 0]}},
        "33": {"type": "Format", "inputs": {"value": ["21", 0]}},
        "34": {"type": "Show", "inputs": {"text": ["33", 0]}},
        "40": {"type": "Format", "inputs": {"value": ["10", 0]}},
        "41": {"type": "Show", "inputs": {"text": ["40", 0]}},
    }}


def test_a_lazy_branch_that_fails_blocks_the_node_that_asked_and_is_named_once(executor):
    outcome, events = run(executor, switch_over_a_failing_branch(), keep_going=True)
    failed = [e for e in events if isinstance(e, NodeFailed)]
    assert [e.node_id for e in failed] == ["21"]  # the branch node, once, though 30 and 33 both need it
    assert stubs.RAN.count("21") == 1
    assert outcome.outputs["41"] == {"text": ["1"]}
    assert {"30", "31", "32", "33", "34"} <= set(outcome.error.blocked)
    assert not {"31", "32", "33", "34"} & set(stubs.RAN)


def test_jobs_run_together_keep_going_each_on_their_own(executor):
    docs = [three_branches(), three_branches(fail_b=False)]
    plans = [executor.plan(parse(d)) for d in docs]
    seen: list[list] = [[], []]
    items = [BatchItem(plan, JobInfo(id=f"job{i}"), seen[i].append, threading.Event(), keep_going=True)
             for i, plan in enumerate(plans)]
    first, second = run_together(executor, items)
    assert first.status == "failed" and [f["node_id"] for f in first.error.failures] == ["5"]
    assert first.outputs["4"] == {"text": ["3"]} and "7" not in first.outputs
    assert second.status == "succeeded" and second.outputs["7"] == {"text": ["2"]}
    assert any(isinstance(e, NodeFailed) for e in seen[0]) and not any(isinstance(e, NodeFailed) for e in seen[1])
