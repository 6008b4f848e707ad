"""ComfyUI's utility_image_segment_sam3 template (comfyui-workflow-templates-json), as its editor saved it:
LoadImage -> a subgraph of CheckpointLoaderSimple(sam3.1_multiplex_fp16.safetensors), CLIPTextEncode("guitar")
and SAM3_Detect(0.5, refine_iterations 2, union mask) -> MaskPreview, InvertMask -> JoinImageWithAlpha ->
PreviewImage (InvertMask reads MaskPreview's pass-through output, as ComfyUI's newer MaskPreview gives
it). It validates with only its files missing and runs on a tiny SAM 3.1 file saved under the
template's name, giving what SAM3_Detect gives called alone (tests/test_sam3.py checks that against
transformers' Sam3Model)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_sam3
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, template_file_errors  # noqa: F401 (fixtures)
from node_call import call

NAME = "utility_image_segment_sam3.json"
CKPT = "sam3.1_multiplex_fp16.safetensors"


def _template() -> dict:
    import comfyui_workflow_templates_json as module

    return json.loads((Path(module.__file__).parent / "templates" / NAME).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sam3-template")
    tiny_sam3.save(tiny_sam3.model(), root / "checkpoints" / CKPT, multiplex=True)
    return root


def test_template_validates_with_only_its_files_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, _template(), tmp_path)
    assert files == {("CheckpointLoader", "ckpt_name"), ("LoadImage", "image")}
    assert wf.nodes["114"].inputs["mask"].node_id == "95" and wf.nodes["95"].type == "MaskPreview"
    detect = next(n for n in wf.nodes.values() if n.type == "SAM3_Detect")
    assert (detect.inputs["threshold"], detect.inputs["refine_iterations"], detect.inputs["individual_masks"]) \
        == (0.5, 2, False)


def test_template_runs_on_the_tiny_file(registry, env):
    from PIL import Image

    rng = np.random.default_rng(4)
    picture = rng.integers(0, 256, (36, 44, 3), np.uint8)
    Image.fromarray(picture).save(env.paths.input.root / "neon_guitarist.png")
    wf = parse_document(_template(), registry)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    masks, boxes = outcome.results["99:75"]
    assert masks.shape == (1, 36, 44) and len(boxes) == 1 and len(boxes[0]) == 1  # "guitar": at most one
    assert 0 < float(masks.sum()) < masks.numel()
    cutout = outcome.results["111"][0]
    assert cutout.shape == (1, 36, 44, 4)
    torch.testing.assert_close(cutout[0, ..., 3], masks[0])  # InvertMask then alpha = 1 - inverted

    model, clip, _ = call(registry.get("CheckpointLoaderSimple"), env, ckpt_name=CKPT)
    cond = call(registry.get("CLIPTextEncode"), env, text="guitar", clip=clip)[0]
    image = torch.from_numpy(picture).float()[None] / 255
    alone = call(registry.get("SAM3_Detect"), env, model=model, image=image, conditioning=cond, threshold=0.5,
                 refine_iterations=2, individual_masks=False)
    assert torch.equal(alone[0], masks) and alone[1] == boxes
