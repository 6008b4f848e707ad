"""SaveLatent and LoadLatent (nodes/latent_files.py): ComfyUI's .latent files on real folders, through the
real Executor and validation (no mocks)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nodes.latent_files as lf
from engine.context import Environment, JobInfo, NodeError
from engine.executor import Executor
from engine.registry import Registry
from engine.validate import WorkflowInvalid
from engine.workflow import parse
from node_call import Called, call


@pytest.fixture
def registry() -> Registry:
    r = Registry()
    r.add_module(lf)
    return r


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path / "data")


def _latent(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, 4, 6, 5), generator=torch.Generator().manual_seed(seed))


def _load_doc(name: str) -> dict:
    return {"1": {"type": "LoadLatent", "inputs": {"latent": name}},
            "2": {"type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "copy"}}}


def _run(registry, env, doc, executor=None, **kwargs):
    return (executor or Executor(registry, env)).run(parse({"version": 1, "nodes": doc}), **kwargs)


def test_save_writes_comfyuis_format_and_a_round_trip_returns_the_same_tensor(env):
    samples = _latent()
    record = Called()
    assert call(lf.save_latent, env, record, samples={"samples": samples}, filename_prefix="latents/Kiln") == ()
    (entry,) = record.ui["latents"]
    assert entry == {"filename": "Kiln_00001_.latent", "subfolder": "latents", "type": "output"}
    path = env.paths.output.root / "latents" / "Kiln_00001_.latent"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert f.get_tensor("latent_format_version_0").numel() == 0
    shutil.copy(path, env.paths.input.root / "mine.latent")
    (loaded,) = call(lf.load_latent, env, latent="mine.latent")
    assert set(loaded) == {"samples"} and loaded["samples"].dtype == torch.float32
    assert torch.equal(loaded["samples"], samples)
    call(lf.save_latent, env, record, samples={"samples": samples}, filename_prefix="latents/Kiln")
    assert record.ui["latents"][0]["filename"] == "Kiln_00002_.latent"  # counts up, never overwrites
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".kiln-")]


def test_a_file_of_the_first_format_is_divided_by_the_scale_it_was_saved_with(env):
    samples = _latent(1)
    save_file({"latent_tensor": samples * 0.18215}, str(env.paths.input.root / "old.latent"))
    (loaded,) = call(lf.load_latent, env, latent="old.latent")
    assert torch.allclose(loaded["samples"], samples, rtol=1e-6, atol=1e-6)


def test_wrong_keys_or_no_safetensors_is_an_error_naming_latent(env):
    save_file({"samples": _latent()}, str(env.paths.input.root / "keys.latent"))
    (env.paths.input.root / "junk.latent").write_bytes(b"not a safetensors file at all")
    for name, words in (("keys.latent", "no 'latent_tensor'"), ("junk.latent", "not a readable")):
        with pytest.raises(NodeError) as err:
            call(lf.load_latent, env, latent=name)
        assert err.value.input_name == "latent" and words in str(err.value)


def test_the_input_folders_latents_are_the_choices_and_others_fail_validation(registry, env, tmp_path):
    root = env.paths.input.root
    save_file({"latent_tensor": _latent(), "latent_format_version_0": torch.tensor([])}, str(root / "a.latent"))
    (root / "sub").mkdir()
    shutil.copy(root / "a.latent", root / "sub" / "c.latent")
    (root / "b.png").write_bytes(b"x")
    shutil.copy(root / "a.latent", tmp_path / "outside.latent")
    assert lf.load_latent.inputs[0].choice_list(env) == ["a.latent", "sub/c.latent"]
    for name in ("missing.latent", "../../outside.latent", str(tmp_path / "outside.latent"), "b.png"):
        with pytest.raises(WorkflowInvalid) as info:
            _run(registry, env, _load_doc(name))
        assert [(e.node_id, e.input_name) for e in info.value.errors] == [("1", "latent")], name
    outcome = _run(registry, env, _load_doc("sub/c.latent"))
    assert outcome.status == "succeeded" and outcome.outputs["2"]["latents"][0]["filename"] == "copy_00001_.latent"


@pytest.mark.parametrize("prefix", ["../escape", "/abs/latent", "latents/", "a/../../b"])
def test_a_prefix_that_leaves_the_output_folder_is_refused_at_validation(registry, env, prefix):
    save_file({"latent_tensor": _latent()}, str(env.paths.input.root / "a.latent"))
    doc = _load_doc("a.latent")
    doc["2"]["inputs"]["filename_prefix"] = prefix
    with pytest.raises(WorkflowInvalid) as info:
        _run(registry, env, doc)
    assert [(e.node_id, e.input_name) for e in info.value.errors] == [("2", "filename_prefix")]


def test_an_edited_file_reruns_the_loader_and_a_touched_one_does_not(registry, env):
    path = env.paths.input.root / "edit.latent"
    save_file({"latent_tensor": _latent(2), "latent_format_version_0": torch.tensor([])}, str(path))
    ex = Executor(registry, env)
    first = _run(registry, env, _load_doc("edit.latent"), executor=ex)
    assert first.executed == ["1", "2"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    assert _run(registry, env, _load_doc("edit.latent"), executor=ex).executed == []
    save_file({"latent_tensor": _latent(3), "latent_format_version_0": torch.tensor([])}, str(path))
    edited = _run(registry, env, _load_doc("edit.latent"), executor=ex)
    assert edited.executed == ["1", "2"] and torch.equal(edited.results["1"][0]["samples"], _latent(3))


def test_the_workflow_is_embedded_unless_turned_off(registry, env):
    save_file({"latent_tensor": _latent()}, str(env.paths.input.root / "a.latent"))
    wf = parse({"version": 1, "nodes": _load_doc("a.latent")})
    job = JobInfo(id="j", workflow=wf.to_api(), kiln_workflow=wf.to_kiln(), extra_pnginfo={"workflow": {"nodes": []}})
    Executor(registry, env).run(wf, job=job)
    with safe_open(str(env.paths.output.root / "copy_00001_.latent"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["prompt"]) == wf.to_api() and json.loads(meta["workflow"]) == {"nodes": []}
    env.settings.embed_workflow = False
    Executor(registry, env).run(wf, job=job)
    with safe_open(str(env.paths.output.root / "copy_00002_.latent"), "pt") as f:
        assert not f.metadata()
