"""SaveAnimatedWEBP / SaveAnimatedPNG: a batch saved as one animation through the executor, the
frames and timing read back with Pillow, the workflow embedded where ComfyUI puts it, the
prefix rules and the safety guard's stamp as SaveImage's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import Environment, Paths
from engine.executor import Executor
from engine.registry import default_registry
from engine.validate import WorkflowInvalid
from engine.workflow import parse


def _frames() -> torch.Tensor:
    """Three 24x16 frames of distinct 8-bit colours (exact in a lossless file)."""
    rng = np.random.default_rng(3)
    return torch.from_numpy(rng.integers(0, 256, (3, 16, 24, 3)).astype(np.float32) / 255)


@pytest.fixture()
def env(tmp_path):
    return Environment(paths=Paths.under(tmp_path / "data"))


def _run(env, node_type: str, **inputs):
    """The node on ``_frames()``, loaded as three PNGs and batched by ComfyUI's ImageBatch."""
    frames = _frames()
    for k in range(3):
        Image.fromarray(np.rint(frames[k].numpy() * 255).astype(np.uint8)).save(env.paths.input.root / f"f{k}.png")
    graph = {str(10 + k): {"class_type": "LoadImage", "inputs": {"image": f"f{k}.png"}} for k in range(3)}
    graph["1"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["11", 0]}}
    graph["3"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["12", 0]}}
    graph["2"] = {"class_type": node_type, "inputs": {"images": ["3", 0], **inputs}}
    outcome = Executor(default_registry(), env).run(parse(json.loads(json.dumps(graph))))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return frames, outcome.outputs["2"]


def _open(env, entry):
    return Image.open(env.paths.output.resolve(entry["filename"], entry["subfolder"]))


@pytest.mark.parametrize("node_type,inputs,suffix", [
    ("SaveAnimatedWEBP", {"filename_prefix": "anim/clip", "fps": 4.0, "lossless": True, "quality": 80,
                          "method": "fastest"}, ".webp"),
    ("SaveAnimatedPNG", {"filename_prefix": "anim/clip", "fps": 4.0, "compress_level": 4}, ".png"),
])
def test_the_batch_becomes_one_animation_with_its_frames_timing_and_workflow(env, node_type, inputs, suffix):
    frames, ui = _run(env, node_type, **inputs)
    [entry] = ui["images"]
    assert entry == {"filename": f"clip_00001_{suffix}", "subfolder": "anim", "type": "output"}
    assert ui["animated"] == (True,)
    with _open(env, entry) as im:
        assert im.n_frames == 3
        for k in range(3):
            im.seek(k)
            im.load()
            assert im.info["duration"] == 250
            assert np.array_equal(np.asarray(im.convert("RGB")), np.rint(frames[k].numpy() * 255).astype(np.uint8))
        if suffix == ".png":
            assert json.loads(im.text["prompt"])["2"]["class_type"] == node_type
        else:
            model = im.getexif()[0x0110]
            assert model.startswith("prompt:") and json.loads(model[len("prompt:"):])["2"]["class_type"] == node_type
    # a second save takes the next number
    _, again = _run(env, node_type, **inputs)
    assert again["images"][0]["filename"] == f"clip_00002_{suffix}"


def test_a_prefix_outside_the_output_folder_is_refused(env):
    with pytest.raises(WorkflowInvalid) as err:
        _run(env, "SaveAnimatedPNG", filename_prefix="../escape", fps=6.0, compress_level=4)
    assert any(e.input_name == "filename_prefix" for e in err.value.errors)
