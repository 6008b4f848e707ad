"""ComfyUI's CameraAngle ("Compose Camera Angle Prompt"): a camera position around a subject as the
words multi-angle edit LoRAs were trained on, and as a camera for 3D nodes.

Qwen-Image-Edit 2511's multiple-angles LoRA (ComfyUI's ``template_qwen_multiangle`` app) is prompted
with a shot description such as "front-left quarter view elevated shot medium shot": one of eight
45-degree sectors around the subject, one of four elevation bands and one of three distances. The node
turns three numbers into that phrase, so a picked angle and the words the LoRA knows cannot disagree.
The bands and words are ComfyUI's (its node's outputs must be the same text for a template to give
the same picture); the camera is the dictionary ComfyUI's 3D nodes read (``LOAD3D_CAMERA``).
"""
from __future__ import annotations

import math
from typing import Any

from engine import types as T
from engine.node import Input, Output, define_node

LOAD3D_CAMERA = "LOAD3D_CAMERA"
#: Azimuth sectors from the front, clockwise seen from above, each 45 degrees wide around its centre.
SECTORS = ("front view", "front-right quarter view", "right side view", "back-right quarter view", "back view",
           "back-left quarter view", "left side view", "front-left quarter view")
#: (elevation below which it applies, words): low-angle looks up at the subject, high-angle down.
ELEVATIONS = ((-15, "low-angle shot"), (15, "eye-level shot"), (45, "elevated shot"), (math.inf, "high-angle shot"))
#: (zoom below which it applies, words): 0 is the widest, 10 the closest.
DISTANCES = ((2, "wide shot"), (6, "medium shot"), (math.inf, "close-up"))
#: The preview's scene: the subject at the origin, the camera on a sphere around it.
CAMERA_DISTANCE, FIELD_OF_VIEW, ZOOM_RANGE = 6.0, 35.0, (1.0, 1.875)


def shot_words(horizontal_angle: float, vertical_angle: float, zoom: float) -> str:
    """The shot description for a camera ``horizontal_angle`` degrees around the subject (0 = front,
    90 = its right), ``vertical_angle`` degrees above it and at ``zoom`` (0..10)."""
    sector = SECTORS[int((horizontal_angle % 360 + 22.5) // 45) % len(SECTORS)]
    elevation = next(words for below, words in ELEVATIONS if vertical_angle < below)
    distance = next(words for below, words in DISTANCES if zoom < below)
    return f"{sector} {elevation} {distance}"


def camera(horizontal_angle: float, vertical_angle: float, zoom: float) -> dict[str, Any]:
    """The camera as ComfyUI's 3D nodes take it: position on the sphere, looking at the subject."""
    yaw, pitch = math.radians(horizontal_angle), math.radians(vertical_angle)
    low, high = ZOOM_RANGE
    return {"position": {"x": CAMERA_DISTANCE * math.cos(pitch) * math.sin(yaw),
                         "y": CAMERA_DISTANCE * math.sin(pitch),
                         "z": CAMERA_DISTANCE * math.cos(pitch) * math.cos(yaw)},
            "target": {"x": 0.0, "y": 0.0, "z": 0.0}, "zoom": low + (high - low) * zoom / 10.0,
            "cameraType": "perspective", "fov": FIELD_OF_VIEW}


@define_node(
    "CameraAngle",
    category="3d",
    display_name="Compose Camera Angle Prompt",
    inputs=[
        Input("horizontal_angle", T.INT, default=0, min=0, max=360, step=1,
              tooltip="Degrees around the subject: 0 the front, 90 its right side, 180 the back"),
        Input("vertical_angle", T.INT, default=0, min=-30, max=60, step=1,
              tooltip="Degrees of elevation: below 0 looks up at the subject, above 0 down on it"),
        Input("zoom", T.FLOAT, default=5.0, min=0.0, max=10.0, step=0.1, tooltip="0 a wide shot, 10 a close-up"),
        Input("image", T.IMAGE, optional=True, tooltip="Shown on the subject in the editor's preview only"),
        Input("view", T.STRING, default="", optional=True,
              tooltip="The editor's preview state (ComfyUI's 3D view widget); does not change the outputs"),
    ],
    outputs=[Output("camera_info", LOAD3D_CAMERA), Output("prompt", T.STRING)],
)
def camera_angle(ctx, horizontal_angle: int, vertical_angle: int, zoom: float, image: Any = None, view: str = ""):
    """The shot description a multi-angle LoRA reads, and the same camera for 3D nodes."""
    return camera(horizontal_angle, vertical_angle, zoom), shot_words(horizontal_angle, vertical_angle, zoom)
