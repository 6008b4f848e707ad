"""Qwen2.5-VL's vision tower in a text-encoder file (Qwen-Image-Edit reads its pictures with it), and the
on-demand build every Qwen-VL tower shares (Qwen2.5-VL's here, Qwen3-VL's: nodes.checkpoint.qwen3_vision).

ComfyUI's ``qwen_2.5_vl_7b*.safetensors`` holds it under ``visual.``; transformers 5 saves it under
``model.visual.``. Its names are transformers' ``Qwen2_5_VisionTransformerPretrainedModel``'s, so
Kiln builds that class (as the ``visual`` of a ``Qwen2_5_VLModel``, nodes.checkpoint.qwen_image_load)
with a config read from the shapes. What the shapes cannot say is the release's: 80-wide heads,
windowed attention (112 pixels) except in every eighth block and the last.

Only the jobs that hand the encoder pictures run the tower (Qwen-Image text-to-image never does; in
Qwen2.5-VL 7B it is about 0.7B parameters), so the loaders build the Qwen-VL model around its language
model with the tower's slot empty and the tower's tensors left unread in the file
(:func:`with_tower_on_demand`); the first use that names :data:`TOWER` builds it (nodes.runtime.deferred).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError

PREFIXES = ("visual.", "model.visual.")
#: The tower's submodule in transformers' Qwen-VL models (Qwen2_5_VLModel, Qwen3VLModel).
TOWER = "visual"
MARKER = "patch_embed.proj.weight"
#: The released tower's head width (1280 wide, 16 heads); narrower towers (tests) get two heads.
HEAD = 80


def vision_view(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The tower's tensors without their prefix, nothing read yet (a lazily read file's view: each tensor
    is read when the tower is built from it); empty when the file has no tower."""
    from nodes.checkpoint.tensors import renamed_view

    for prefix in PREFIXES:
        if prefix + MARKER in state:
            return renamed_view(state, {k[len(prefix):]: k for k in state if k.startswith(prefix)})
    return {}


def vision_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The tower's tensors without their prefix, read; empty when the file has no tower."""
    return dict(vision_view(state))


def vision_config(shapes: Mapping[str, tuple], what: str) -> dict[str, Any]:
    """Qwen2_5_VLVisionConfig's fields from the tower's shapes (see the module docstring)."""
    try:
        hidden, _, temporal, patch, _ = shapes[MARKER]
        merged = shapes["merger.mlp.0.weight"][1]
        out = shapes["merger.mlp.2.weight"][0]
        inter = shapes["blocks.0.mlp.gate_proj.weight"][0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{what}: an incomplete Qwen2.5-VL vision tower (visual.{exc} is missing or "
                              "misshapen)") from None
    depth = len({int(m.group(1)) for k in shapes for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    merge = round((merged // hidden) ** 0.5)
    heads = hidden // HEAD if hidden % HEAD == 0 else 2
    return {"depth": depth, "hidden_size": hidden, "intermediate_size": inter, "num_heads": heads,
            "out_hidden_size": out, "patch_size": patch, "temporal_patch_size": temporal,
            "spatial_merge_size": merge, "window_size": 112, "in_channels": 3, "hidden_act": "silu",
            "fullatt_block_indexes": [i for i in range(depth) if i % 8 == 7 or i == depth - 1]}


def with_tower_on_demand(model_class: Any, tower_class: Any, config: Any, text_model: Any,
                         visual: Mapping[str, Any], what: str, dtype: Any, label: str) -> Any:
    """transformers' Qwen-VL ``model_class`` (``Qwen2_5_VLModel``, ``Qwen3VLModel``; ``config`` its config,
    the vision config read from the tower's shapes by the caller, so an incomplete tower is a load error)
    around the built language model ``text_model``, its tower left unbuilt: :data:`TOWER` is built as
    ``tower_class`` from ``visual``, the file's bare tower tensors (a lazily read file's view keeps them
    unread until then), when a use first names it (nodes.runtime.deferred). Nothing of the tower is
    allocated before: the wrapper is made on "meta" and its language model replaced by ``text_model``.
    ``label`` names the tower in errors."""
    from nodes.checkpoint.load import _empty
    from nodes.runtime import deferred

    model = _empty(model_class, config)  # every weight on "meta": the text model replaces its own
    model.language_model = text_model
    tower_config = model.config.vision_config
    deferred.defer(model, TOWER, lambda: build_tower(tower_class, visual, tower_config, what, dtype, label))
    return model.eval()


def build_tower(tower_class: Any, visual: Mapping[str, Any], config: Any, what: str, dtype: Any, label: str) -> Any:
    """transformers' vision tower ``tower_class`` (``config``: its vision config) holding the bare tower tensors
    ``visual``; fp8_scaled / int8 layers get their scales (nodes.checkpoint.scaled_fp8)."""
    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.load import _empty

    sub, scales = scaled_fp8.take(visual, what)
    tower = _empty(tower_class, config)
    return scaled_fp8.fill_as_stored(tower, sub, scales, dtype, what, f"{label} ({what})")
