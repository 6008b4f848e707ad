"""Cosmos Predict2 from a diffusers folder (``Cosmos2TextToImagePipeline.save_pretrained``) through
CheckpointLoaderSimple and DiffusersLoader: the same weights bit for bit as the split files, and the same images
as the split-file graph (which tests/test_cosmos.py proves equal to the pipeline within 1/255)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_cosmos
from flow_family_files import env, models_root, registry, run  # noqa: F401 (env, registry: fixtures)
from node_call import call
from nodes import loaders, split_loaders
from nodes.families import cosmos
from test_cosmos import comfy_graph

FOLDER = "tiny-cosmos-diffusers"


def _make(root):
    tiny_cosmos.make_models_folder(root)
    for where in ("checkpoints", "diffusers"):
        tiny_cosmos.pipeline().save_pretrained(str(root / where / FOLDER), safe_serialization=True)
    return root


root = models_root(_make, "cosmos-folder-models")


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("how", ["checkpoint", "diffusers"])
def test_the_folder_loads_every_weight_bit_for_bit(env, how):
    if how == "checkpoint":
        model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=FOLDER)
    else:
        model, clip, vae = call(loaders.diffusers_loader, env, model_path=FOLDER)
    assert model.family is cosmos.FAMILY and clip.family is cosmos.FAMILY
    parts = tiny_cosmos.components()
    with model.unet() as net:
        got = _weights(net)
    want = _weights(parts["transformer"])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with clip.encoder("text_encoder") as t5:
        got = _weights(t5)
    want = _weights(parts["text_encoder"])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    (split_vae,) = call(loaders.vae_loader, env, vae_name="tiny-wan_2.1_vae.safetensors")
    with vae.module() as folder_module, split_vae.module() as split_module:  # the split file: Wan's own names
        got, want = _weights(folder_module), _weights(split_module)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    got = {k.removeprefix("vae."): v for k, v in got.items()}  # Kiln's image surface holds the video VAE as .vae
    theirs = _weights(parts["vae"])  # diffusers' AutoencoderKLWan: the same names as Kiln's Wan 2.1 VAE
    assert set(got) == set(theirs) and all(torch.equal(got[k], theirs[k]) for k in theirs)


def test_checkpoint_loader_graph_equals_the_split_file_graph(registry, env):
    split = comfy_graph()
    folder = {k: v for k, v in comfy_graph().items() if k not in ("1", "2", "3")}
    folder["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FOLDER}}
    folder["4"]["inputs"]["clip"] = folder["5"]["inputs"]["clip"] = ["1", 1]
    folder["8"]["inputs"]["vae"] = ["1", 2]
    ours = run(registry, env, _parse(folder)).results["8"][0].numpy()
    theirs = run(registry, env, _parse(split)).results["8"][0].numpy()
    gap = float(np.abs(ours - theirs).max())
    print(f"CheckpointLoaderSimple folder graph against the split-file graph: {gap * 255:.4f}/255")
    assert ours.shape == (1, 64, 64, 3) and gap <= 1e-6


def _parse(graph: dict):
    from engine.workflow import parse

    return parse(json.loads(json.dumps(graph)))
