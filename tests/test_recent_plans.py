"""An identical resubmission reuses its document's plan but re-checks the environment (engine.submission).

Real folders and files; the node's own validate hook reads the disk, as LoadImage's does.
"""
from __future__ import annotations

import pytest

import stub_nodes
from engine import types as T
from engine.context import Environment, Paths
from engine.node import Input, Result, define_node
from engine.submission import SubmissionInvalid, prepare


def _file_problem(env, literals):
    if not (env.paths.input.root / literals["name"]).is_file():
        return [("name", f"no file {literals['name']} in the input folder")]
    return []


@define_node("NeedsFile", category="test", output_node=True,
             inputs=[Input("name", T.STRING), Input("times", T.INT, default=1, min=1, max=10)],
             validate=_file_problem)
def _needs_file(ctx, name, times):
    return Result(ui={"text": [name * times]})


@pytest.fixture
def setup(tmp_path):
    registry = stub_nodes.make_registry()
    registry.add(_needs_file)
    env = Environment(paths=Paths.under(tmp_path / "data"))
    env.paths.input.root.mkdir(parents=True, exist_ok=True)
    (env.paths.input.root / "a.txt").write_text("a")
    return registry, env


def _doc(name: str = "a.txt", times: int = 1) -> dict:
    return {"version": 1, "nodes": {"1": {"type": "NeedsFile", "inputs": {"name": name, "times": times}}}}


def test_an_identical_document_reuses_its_plan_until_the_disk_says_otherwise(setup):
    registry, env = setup
    first = prepare(_doc(), registry, env)[1]
    assert prepare(_doc(), registry, env)[1] is first  # remembered: only the environment checks ran
    (env.paths.input.root / "a.txt").unlink()
    with pytest.raises(SubmissionInvalid) as caught:
        prepare(_doc(), registry, env)
    error = caught.value.errors[0]
    assert (error.node_id, error.input_name) == ("1", "name") and "a.txt" in error.message
    (env.paths.input.root / "a.txt").write_text("a")
    again = prepare(_doc(), registry, env)[1]
    assert again is not first  # validated from the start after the failure
    assert prepare(_doc(), registry, env)[1] is again


def test_another_document_parameters_or_another_registry_are_validated_in_full(setup):
    registry, env = setup
    first = prepare(_doc(), registry, env)[1]
    with pytest.raises(SubmissionInvalid) as caught:
        prepare(_doc(times=11), registry, env)  # a different literal: its own validation, which refuses it
    assert caught.value.errors[0].input_name == "times"
    doc = {**_doc(), "params": {"times": "1.times"}}
    one = prepare(doc, registry, env, {"times": "2"})
    two = prepare(doc, registry, env, {"times": "2"})
    assert one[1] is not two[1] and one[2] == {"times": 2}  # with parameters nothing is remembered
    other = stub_nodes.make_registry()
    other.add(_needs_file)
    assert prepare(_doc(), other, env)[1] is not first  # another registry: another basis
