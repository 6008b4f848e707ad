"""ComfyUI's DiffusersLoader (nodes/loaders.py): diffusers pipeline folders in models/diffusers.

It offers exactly the folders holding model_index.json (at any depth, no loose files), as the
model routes list that folder; what it loads samples as CheckpointLoader's load of the same
folder does, bit for bit; a name that is no pipeline folder is refused naming model_path; a
ComfyUI API prompt using it validates and runs.
"""
from __future__ import annotations

import shutil

import pytest

from engine.context import NodeError
from test_custom_sampling import _ksampler_prompt


@pytest.fixture
def models(tiny_models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "checkpoints", root / "checkpoints")
    shutil.copytree(tiny_models_dir / "checkpoints" / "tiny-sd1-diffusers", root / "diffusers" / "sd" / "tiny-sd1")
    (root / "diffusers" / "stray.safetensors").write_bytes(b"x")  # a file: not a pipeline
    (root / "diffusers" / "half").mkdir()
    (root / "diffusers" / "half" / "unet").mkdir()  # a folder without model_index.json
    return root


@pytest.fixture
def env(models, tmp_path):
    from node_call import environment_over

    yield from environment_over(models, tmp_path)


def test_it_offers_the_pipeline_folders_and_the_route_agrees(env, models):
    from engine.model_files import folder_models
    from engine.registry import default_registry
    from nodes import model_folders

    spec = default_registry().get("DiffusersLoader")
    assert spec.category == "advanced/loaders/deprecated"
    assert [o.type for o in spec.outputs] == ["MODEL", "CLIP", "VAE"]
    assert spec.input("model_path").choice_list(env) == ["sd/tiny-sd1"]
    assert folder_models(models, "diffusers") == ["sd/tiny-sd1"]  # what /api/models/diffusers serves
    assert "diffusers" in model_folders.FOLDERS


def test_a_prompt_with_it_runs_as_the_checkpoint_loader_does(env):
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse

    executor = Executor(default_registry(), env)
    prompt = _ksampler_prompt(8)
    prompt["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1-diffusers"}}
    reference = executor.run(parse(prompt))
    assert reference.status == "succeeded", reference.error and reference.error.message
    prompt["4"] = {"class_type": "DiffusersLoader", "inputs": {"model_path": "sd/tiny-sd1"}}
    ours = executor.run(parse(prompt))
    assert ours.status == "succeeded", ours.error and ours.error.message
    assert ours.results["8"][0].numpy().tobytes() == reference.results["8"][0].numpy().tobytes()
    other = executor.run(parse(_ksampler_prompt(9) | {"4": prompt["4"]}))
    assert (other.results["8"][0] - ours.results["8"][0]).abs().max().item() > 1e-2  # not a constant image


@pytest.mark.parametrize("name", ["half", "stray.safetensors", "nowhere", "../checkpoints/tiny-sd1-diffusers", ""])
def test_what_is_no_pipeline_folder_is_refused_naming_model_path(env, name):
    from engine.context import NodeContext
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.validate import WorkflowInvalid
    from engine.workflow import parse
    from nodes.loaders import diffusers_loader

    ctx = NodeContext(env=env, job=None, node_id="4", node_type="DiffusersLoader", _progress=lambda *a: None,
                      _is_interrupted=lambda: False, _message=lambda m: None)
    with pytest.raises(NodeError) as err:
        diffusers_loader(ctx, name)
    assert err.value.input_name == "model_path"
    prompt = _ksampler_prompt(8)
    prompt["4"] = {"class_type": "DiffusersLoader", "inputs": {"model_path": name}}
    with pytest.raises(WorkflowInvalid, match="model_path"):
        Executor(default_registry(), env).run(parse(prompt))
