"""What the flow-matching transformer families load alike (Chroma, FLUX.2, Qwen-Image, Z-Image).

Each of them is a lone diffusion model file for UNETLoader (its text encoders and VAE come from
their own loaders) or a diffusers folder whose transformer config names the class; the rules for
the file, the folder test and the loader's message are the same for all, so they live here once.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import Loaded
from nodes.checkpoint.tensors import plain


def flow_info(transformer: Any, fmt: str, label: str) -> dict[str, Any]:
    """The loader's info, as FLUX's: the weights held as stored are named for the loader's message."""
    from nodes.checkpoint.flux_load import _held_note
    from nodes.runtime.fp8 import fp8_bytes

    return {"format": fmt, "prediction_type": "flow", "prediction_reason": f"flow matching ({label})",
            "fp8": fp8_bytes(transformer) > 0, **_held_note(transformer)}


def transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str, build: Callable[..., Any],
                     family: Any, label: str) -> Loaded:
    """UNETLoader's path for one of these families: ``build(state, name, dtype)`` makes the module;
    ``fp8`` (a torch dtype name) stores the linear weights in that 8-bit float first."""
    from nodes.checkpoint.scaled_fp8 import is_scaled

    state = plain(state)
    if fp8 and not is_scaled(state):  # as ComfyUI: a scaled file keeps its own storage
        import torch

        target = getattr(torch, fp8)
        state = {k: v.to(target) if v.ndim == 2 and k.endswith(".weight") and v.is_floating_point() else v
                 for k, v in state.items()}
    transformer = build(state, name, dtype)
    return Loaded(family=family, scheduler_config=family.scheduler_config(), latent=family.latent,
                  modules={"unet": transformer}, info=flow_info(transformer, "unet", label))


def is_pipeline_folder(path: Path, transformer_class: str) -> bool:
    """A diffusers pipeline folder whose transformer config names ``transformer_class``."""
    config = path / "transformer" / "config.json"
    if not (path.is_dir() and (path / "model_index.json").is_file() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == transformer_class
    except (OSError, ValueError):
        return False
