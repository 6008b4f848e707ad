"""The executor on stub nodes: order, pruning, caching, eviction, failure, interruption."""
from __future__ import annotations

import threading

import networkx as nx
import pytest

import stub_nodes as stubs
from engine.cache import OutputCache
from engine.context import Environment
from engine.events import JobFailed, JobFinished, JobInterrupted, NodeFinished, NodesCached, NodeStarted, Progress
from engine.executor import Executor
from engine.workflow import parse


@pytest.fixture(autouse=True)
def _reset_stubs():
    stubs.RAN.clear()
    stubs.GATE.clear()
    yield


@pytest.fixture
def executor(tmp_path) -> Executor:
    return Executor(stubs.make_registry(), Environment.for_folder(tmp_path))


def chain(value: float = 2.0, extra: dict | None = None) -> dict:
    """1:Number -> 2:Add(+3) -> 3:Format -> 4:Show, plus 9: an unconnected Number."""
    nodes = {
        "1": {"type": "Number", "inputs": {"value": value}},
        "2": {"type": "Add", "inputs": {"a": ["1", 0], "b": 3}},
        "3": {"type": "Format", "inputs": {"value": ["2", 0]}},
        "4": {"type": "Show", "inputs": {"text": ["3", 0]}},
        "9": {"type": "Number", "inputs": {"value": 7}},
    }
    nodes.update(extra or {})
    return {"version": 1, "nodes": nodes}


def run(executor: Executor, doc: dict, **kwargs):
    events = []
    outcome = executor.run(parse(doc), on_event=events.append, **kwargs)
    return outcome, events


def test_runs_in_topological_order_and_only_ancestors_of_outputs(executor):
    doc = chain(extra={
        # Listed before its inputs and with ids out of order: order must come from the graph.
        "0": {"type": "Show", "inputs": {"text": ["12", 0]}},
        "12": {"type": "Join", "inputs": {"a": ["3", 0], "b": "x"}},
    })
    outcome, _ = run(executor, doc)
    assert outcome.status == "succeeded"
    graph = parse(doc).graph()
    position = {n: i for i, n in enumerate(stubs.RAN)}
    for src, dst in graph.edges():
        if src in position and dst in position:
            assert position[src] < position[dst], (src, dst, stubs.RAN)
    assert "9" not in stubs.RAN  # not upstream of any output
    assert set(stubs.RAN) == {"0", "1", "2", "3", "4", "12"}
    assert outcome.outputs["4"] == {"text": ["5"]}
    assert outcome.outputs["0"] == {"text": ["5 x"]}
    assert nx.is_directed_acyclic_graph(graph)


def test_identical_second_run_executes_nothing(executor):
    first, _ = run(executor, chain())
    stubs.RAN.clear()
    second, events = run(executor, chain())
    assert stubs.RAN == []
    assert second.executed == []
    assert second.outputs == first.outputs
    cached_event = next(e for e in events if isinstance(e, NodesCached))
    assert cached_event.node_ids == ["4"]  # the output is served; its inputs need not be touched
    assert not any(isinstance(e, NodeStarted) for e in events)
    # the cached output node still reports its UI output, as ComfyUI's executed message does
    assert any(isinstance(e, NodeFinished) and e.cached and e.node_id == "4" for e in events)


def test_changing_one_literal_reruns_exactly_its_downstream(executor):
    doc = chain(extra={
        "5": {"type": "Number", "inputs": {"value": 10}},
        "6": {"type": "Multiply", "inputs": {"a": ["5", 0], "b": ["2", 0]}},
        "7": {"type": "Format", "inputs": {"value": ["6", 0]}},
        "8": {"type": "Show", "inputs": {"text": ["7", 0]}},
    })
    run(executor, doc)
    stubs.RAN.clear()
    doc["nodes"]["5"]["inputs"]["value"] = 11
    outcome, _ = run(executor, doc)
    assert sorted(stubs.RAN) == ["5", "6", "7", "8"]
    assert outcome.outputs["8"] == {"text": ["55"]}


def test_force_reruns_everything_needed(executor):
    run(executor, chain())
    stubs.RAN.clear()
    run(executor, chain(), force=True)
    assert stubs.RAN == ["1", "2", "3", "4"]


def test_identical_subgraphs_under_different_ids_share_one_result(executor):
    doc = chain(extra={
        "21": {"type": "Number", "inputs": {"value": 2.0}},
        "22": {"type": "Add", "inputs": {"a": ["21", 0], "b": 3}},
        "23": {"type": "Format", "inputs": {"value": ["22", 0]}},
        "24": {"type": "Join", "inputs": {"a": ["23", 0], "b": "!", "sep": "-"}},
        "25": {"type": "Show", "inputs": {"text": ["24", 0]}},
    })
    run(executor, chain())
    stubs.RAN.clear()
    outcome, _ = run(executor, doc)
    # 21..23 repeat 1..3 under other ids: served from the first run's cache.
    assert stubs.RAN == ["24", "25"]
    assert outcome.outputs["25"] == {"text": ["5-!"]}


def test_byte_budget_evicts_least_recently_used(tmp_path):
    cache = OutputCache(budget_bytes=2500)
    executor = Executor(stubs.make_registry(), Environment.for_folder(tmp_path), cache)

    def blob_doc(tag: str, label: str = "") -> dict:
        return {"nodes": {"1": {"type": "Blob", "inputs": {"size": 1000, "tag": tag}},
                          "2": {"type": "BlobSize", "inputs": {"blob": ["1", 0], "label": label}}}}

    for tag in ("a", "b", "c"):
        run(executor, blob_doc(tag))
    assert cache.nbytes <= 2500
    assert cache.evictions >= 1
    # A new consumer (another label) needs each blob again: only evicted ones re-run.
    stubs.RAN.clear()
    run(executor, blob_doc("c", label="again"))  # most recent blob: still cached
    assert stubs.RAN == ["2"]
    stubs.RAN.clear()
    run(executor, blob_doc("a", label="again"))  # oldest blob: evicted, so it runs again
    assert stubs.RAN == ["1", "2"]


def test_value_bigger_than_budget_is_not_cached_but_job_succeeds(tmp_path):
    cache = OutputCache(budget_bytes=100)
    executor = Executor(stubs.make_registry(), Environment.for_folder(tmp_path), cache)
    doc = {"nodes": {"1": {"type": "Blob", "inputs": {"size": 1000}}, "2": {"type": "BlobSize", "inputs": {"blob": ["1", 0]}}}}
    outcome, _ = run(executor, doc)
    assert outcome.outputs["2"] == {"text": ["1000"]}
    assert cache.nbytes <= 100


def test_cache_clear_makes_everything_run_again(executor):
    run(executor, chain())
    executor.cache.clear()
    stubs.RAN.clear()
    run(executor, chain())
    assert stubs.RAN == ["1", "2", "3", "4"]


def test_failing_node_reports_error_and_caches_nothing_for_itself(executor):
    doc = chain(extra={"5": {"type": "Fail", "inputs": {"value": ["2", 0]}},
                       "6": {"type": "Format", "inputs": {"value": ["5", 0]}},
                       "7": {"type": "Show", "inputs": {"text": ["6", 0]}}})
    outcome, events = run(executor, doc)
    assert outcome.status == "failed"
    failed = events[-1]
    assert isinstance(failed, JobFailed)
    assert (failed.node_id, failed.node_type, failed.input_name) == ("5", "Fail", "value")
    assert "refusing 5" in failed.message
    assert any("Traceback" in line for line in failed.traceback)
    assert not any(isinstance(e, JobFinished) for e in events)
    # Earlier results are intact: a run without the failing branch executes nothing new
    # except what never ran.
    stubs.RAN.clear()
    outcome, _ = run(executor, chain())
    assert "1" not in stubs.RAN and "2" not in stubs.RAN
    # The failing node itself was not cached: it runs (and fails) again.
    stubs.RAN.clear()
    run(executor, doc)
    assert "5" in stubs.RAN


def test_interruption_mid_job_stops_cooperatively(executor):
    doc = chain(extra={"5": {"type": "Slow", "inputs": {"value": ["2", 0], "ticks": 500}},
                       "6": {"type": "Format", "inputs": {"value": ["5", 0]}},
                       "7": {"type": "Show", "inputs": {"text": ["6", 0]}}})
    stop = threading.Event()
    result = {}

    def target():
        result["outcome"], result["events"] = run(executor, doc, interrupt=stop)

    thread = threading.Thread(target=target)
    thread.start()
    assert stubs.GATE.wait(10)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    outcome, events = result["outcome"], result["events"]
    assert outcome.status == "interrupted"
    assert isinstance(events[-1], JobInterrupted)
    assert events[-1].node_id == "5"
    ticks = [e for e in events if isinstance(e, Progress)]
    assert 0 < len(ticks) < 500
    assert "6" not in stubs.RAN and "7" not in stubs.RAN


def test_interrupt_before_start_runs_nothing(executor):
    stop = threading.Event()
    stop.set()
    outcome, events = run(executor, chain(), interrupt=stop)
    assert outcome.status == "interrupted"
    assert stubs.RAN == []


def test_fingerprint_always_reruns(executor):
    doc = {"nodes": {"1": {"type": "Clock", "inputs": {}}, "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
                     "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}
    run(executor, doc)
    stubs.RAN.clear()
    run(executor, doc)
    # Clock always re-runs; its value is unchanged but its signature is new, so its
    # downstream runs too (a fingerprint says "the world may have changed").
    assert stubs.RAN == ["1", "2", "3"]


def test_partial_execution_targets_only_run_their_ancestors(executor):
    doc = chain(extra={"10": {"type": "Show", "inputs": {"text": "other"}}})
    outcome, _ = run(executor, doc, outputs=["10"])
    assert stubs.RAN == ["10"]
    assert set(outcome.outputs) == {"10"}


def test_event_stream_shape(executor):
    _, events = run(executor, chain())
    kinds = [e.type for e in events]
    assert kinds[0] == "job_started" and kinds[1] == "nodes_cached" and kinds[-1] == "job_finished"
    assert kinds.count("node_started") == 4 == kinds.count("node_finished")
    as_dicts = [e.to_dict() for e in events]
    assert all(d["job_id"] == events[0].job_id for d in as_dicts)
    assert as_dicts[-1]["outputs"] == {"4": {"text": ["5"]}}
