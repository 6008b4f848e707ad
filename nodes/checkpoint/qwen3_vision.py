"""Qwen3-VL's vision tower in a text-encoder file (Krea 2's qwen3vl_4b; Qwen-Image 2.1's and FIBO 2's Qwen3-VL).

ComfyUI's files hold it under ``visual.`` beside the language model under ``model.``; transformers 5
saves it under ``model.visual.``. Its names are transformers' ``Qwen3VLVisionModel``'s (patch embedding,
learned position table, blocks, the merger and the DeepStack mergers ``deepstack_merger_list.N``), so
Kiln builds that class as the ``visual`` of a ``Qwen3VLModel`` with a config read from the shapes, when
a job first hands the encoder a picture (:func:`with_tower_on_demand`). What the shapes cannot say is
the release's: 16 heads, the GELU-tanh MLP, and which vision layers feed the DeepStack mergers
(Qwen3-VL-4B: 5, 11, 17 of 24; 8B and 32B: 8, 16, 24 of 27; ComfyUI's table). A tower of another
depth (tests) gets its mergers spread evenly.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.qwen_vision import MARKER, TOWER, vision_state, vision_view  # noqa: F401 (Qwen2.5-VL's prefixes)

#: The released towers' head count; towers narrower than WIDE (tests) get two heads.
HEADS, WIDE = 16, 512
#: depth -> the vision layers whose features the DeepStack mergers take (the releases').
DEEPSTACK = {24: [5, 11, 17], 27: [8, 16, 24]}
#: config field -> (tensor, axis) whose size it is.
SIZES = {"positions": ("pos_embed.weight", 0), "merged": ("merger.linear_fc1.weight", 1),
         "out": ("merger.linear_fc2.weight", 0), "intermediate": ("blocks.0.mlp.linear_fc1.weight", 0)}


def deepstack_layers(depth: int, mergers: int) -> list[int]:
    """The vision layers read by ``mergers`` DeepStack mergers in a tower of ``depth`` blocks."""
    known = DEEPSTACK.get(depth)
    if known is not None and len(known) == mergers:
        return list(known)
    return [(i + 1) * depth // (mergers + 1) for i in range(mergers)]


def vision_config(shapes: Mapping[str, tuple], what: str) -> dict[str, Any]:
    """Qwen3VLVisionConfig's fields from the tower's shapes (see the module docstring)."""
    def count(pattern: str) -> int:
        return len({int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m})

    if len(shapes.get(MARKER, ())) != 5:
        raise CheckpointError(f"{what}: an incomplete Qwen3-VL vision tower (visual.{MARKER} is missing or "
                              "misshapen)")
    hidden, channels, temporal, patch, _ = shapes[MARKER]
    found = {}
    for name, (key, axis) in SIZES.items():
        if key not in shapes:
            raise CheckpointError(f"{what}: an incomplete Qwen3-VL vision tower (visual.{key} is missing)")
        found[name] = shapes[key][axis]
    depth = count(r"blocks\.(\d+)\.")
    return {"depth": depth, "hidden_size": hidden, "intermediate_size": found["intermediate"],
            "num_heads": HEADS if hidden >= WIDE else 2, "in_channels": channels, "patch_size": patch,
            "temporal_patch_size": temporal, "spatial_merge_size": round((found["merged"] // hidden) ** 0.5),
            "out_hidden_size": found["out"], "num_position_embeddings": found["positions"],
            "hidden_act": "gelu_pytorch_tanh",
            "deepstack_visual_indexes": deepstack_layers(depth, count(r"deepstack_merger_list\.(\d+)\."))}


def with_tower_on_demand(text_model: Any, visual: Mapping[str, Any], what: str, dtype: Any, label: str) -> Any:
    """transformers' ``Qwen3VLModel`` around the built language model ``text_model`` (a Qwen3VLTextModel),
    its tower left unbuilt (nodes.checkpoint.qwen_vision.with_tower_on_demand, as Qwen2.5-VL's): the config
    is read from the tower's shapes now (an incomplete tower is a CheckpointError at load, as before), the
    weights from ``visual``, the file's bare tower tensors, when a job first hands the encoder a picture.
    ``label`` names the tower in errors."""
    from transformers import Qwen3VLConfig, Qwen3VLModel, Qwen3VLVisionModel

    from nodes.checkpoint import qwen_vision
    from nodes.checkpoint.tensors import shapes_of

    vision = vision_config(shapes_of(visual), what)
    config = Qwen3VLConfig(text_config=text_model.config.to_dict(), vision_config=vision)
    return qwen_vision.with_tower_on_demand(Qwen3VLModel, Qwen3VLVisionModel, config, text_model, visual, what,
                                            dtype, label)
