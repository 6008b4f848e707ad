"""CameraAngle ("Compose Camera Angle Prompt"): the shot words a multi-angle edit LoRA reads, at the
sector and band edges where a wrong comparison would show, and ComfyUI's multi-angle app template
holding it converts and validates with only its model files missing."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.formats import parse_document
from engine.registry import default_registry
from engine.validate import WorkflowInvalid, validate
from node_call import call
from nodes.camera_angle import camera_angle


@pytest.mark.parametrize("h,v,zoom,words", [
    (0, 0, 5.0, "front view eye-level shot medium shot"),
    (22, -15, 1.9, "front view eye-level shot wide shot"),  # -15 is eye level; 22 still the front
    (23, -16, 2.0, "front-right quarter view low-angle shot medium shot"),
    (90, 14, 6.0, "right side view eye-level shot close-up"),
    (180, 15, 10.0, "back view elevated shot close-up"),
    (247, 44, 0.0, "back-left quarter view elevated shot wide shot"),
    (270, 45, 5.9, "left side view high-angle shot medium shot"),
    (333, 17, 5.0, "front-left quarter view elevated shot medium shot"),  # the template's own values
    (337, 60, 5.0, "front-left quarter view high-angle shot medium shot"),
    (338, -30, 5.0, "front view low-angle shot medium shot"),
    (360, 0, 5.0, "front view eye-level shot medium shot"),
])
def test_the_shot_words_follow_the_angle(tiny_env, h, v, zoom, words):
    camera, prompt = call(camera_angle, tiny_env, horizontal_angle=h, vertical_angle=v, zoom=zoom)
    assert prompt == words
    position = camera["position"]
    assert math.isclose(math.hypot(position["x"], position["y"], position["z"]), 6.0)  # on the sphere
    assert math.isclose(position["y"], 6.0 * math.sin(math.radians(v)), abs_tol=1e-9)  # above by the elevation
    assert camera["target"] == {"x": 0.0, "y": 0.0, "z": 0.0} and 1.0 <= camera["zoom"] <= 1.875


def test_comfyuis_multi_angle_app_template_validates_but_for_its_files(tiny_env):
    import importlib

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    registry = default_registry()
    wf = parse_document(json.loads((folder / "template_qwen_multiangle.app.json").read_text(encoding="utf-8")),
                        registry)
    (node,) = [n for n in wf.nodes.values() if n.type == "CameraAngle"]
    assert (node.inputs["horizontal_angle"], node.inputs["vertical_angle"], node.inputs["zoom"]) == (333, 17, 5)
    with pytest.raises(WorkflowInvalid) as caught:
        validate(wf, registry, tiny_env)
    errors = {(e.node_type, e.input_name, e.type) for e in caught.value.errors}
    # only the files this machine lacks: the models and the input picture
    assert errors and all((kind, name.endswith("_name")) == ("value_not_in_list", True)
                          or (kind, name) == ("custom_validation_failed", "image") for _, name, kind in errors), errors
    assert not any(node_type == "CameraAngle" for node_type, _, _ in errors)
