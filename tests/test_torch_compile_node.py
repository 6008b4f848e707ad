"""TorchCompileModel: ComfyUI's node runs unchanged; Kiln's compiled mode stays the process's choice.

The node passes its MODEL through and says whether this process compiles it; a ComfyUI
graph with the node gives the same bytes as without it (compiling here would take
minutes on the CI's CPU, which is exactly why a workflow does not get to force it).
"""
from __future__ import annotations

import json

import pytest
import torch

import tiny_models
from engine.context import Environment, NodeError, Paths
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from node_call import Called, call
from nodes.runtime.models import ModelManager
from nodes.torch_compile import torch_compile_model


def _graph(with_node: bool) -> dict:
    model = ["9", 0] if with_node else ["1", 0]
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_models.checkpoint_name("sd1")}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a barn", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    if with_node:
        graph["9"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}}
    return graph


def test_a_comfyui_graph_with_the_node_runs_and_equals_the_graph_without(tiny_env):
    registry = default_registry()
    runs = [Executor(registry, tiny_env).run(parse(json.loads(json.dumps(_graph(flag))))) for flag in (True, False)]
    assert all(r.status == "succeeded" for r in runs), [r.error and r.error.message for r in runs]
    assert torch.equal(runs[0].results["5"][0]["samples"], runs[1].results["5"][0]["samples"])
    assert runs[0].results["9"][0] is runs[0].results["1"][0]


@pytest.mark.parametrize("mode,said", [("off", "not compiled: this process runs with --compile off"),
                                       ("on", "compiled by Kiln's compiled mode (--compile on")])
def test_the_node_says_what_this_process_does(tiny_env, tmp_path, mode, said):
    from nodes.loaders import checkpoint_loader

    (model, _, _) = call(checkpoint_loader, tiny_env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    env = Environment(paths=Paths.under(tmp_path / "other"), models=ModelManager(device="cpu", compile_mode=mode))
    rec = Called()
    (out,) = call(torch_compile_model, env, rec, model=model, backend="inductor")
    assert out is model and said in rec.messages[0]
    with pytest.raises(NodeError) as err:
        call(torch_compile_model, env, model=model, backend="tensorrt")
    assert err.value.input_name == "backend"
    with pytest.raises(NodeError) as err:
        call(torch_compile_model, env, model="not a model", backend="inductor")
    assert err.value.input_name == "model"
