"""Content safety: SafetyCheckerLoader and SafetyFilter nodes, and the server's guard.

The classifier is diffusers' StableDiffusionSafetyChecker (see :mod:`.checker`);
what a flagged image becomes is one rule in :mod:`.modes`; :mod:`.guard` applies
both to every image a server lets out when ``kiln serve --safety-filter`` is on.
torch is imported only when a checker is loaded.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from engine import types as T
from engine.context import Environment, NodeError
from engine.node import Input, Output, Result, define_node
from nodes.loaders import model_manager, fingerprinter, list_models, locate, validator
from nodes.runtime.models import file_key
from nodes.safety.checker import FOLDER, CheckerError, SafetyCheckerHandle, load_checker
from nodes.safety.modes import MODES, apply_mode, summary

#: Socket types: a loaded checker, and one flag per image of a batch (list[bool]).
SAFETY_CHECKER = "SAFETY_CHECKER"
SAFETY_FLAGS = "SAFETY_FLAGS"


def _checkers(env: Environment | None) -> list[str]:
    return list_models(env, FOLDER, "config.json")


def _load(path: Path, name: str, manager: Any) -> Any:
    return load_checker(path, manager.dtype, name)


def open_checker(env: Environment, name: Any, input_name: str = "checker_name") -> SafetyCheckerHandle:
    """A handle to the checker ``name`` in models/safety_checker, loaded once through the model manager."""
    path = locate(env, FOLDER, name, input_name)
    manager = model_manager(env)
    key = file_key(path, "safety_checker")
    loader = functools.partial(_load, path, name)
    try:
        loaded = manager.acquire(key, loader)
    except CheckerError as exc:
        raise NodeError(str(exc), input_name=input_name) from exc
    return SafetyCheckerHandle(name=name, processor=loaded.processor,
                               _use=lambda: manager.use(key, "checker", loader))


@define_node(
    "SafetyCheckerLoader",
    category="loaders",
    display_name="Load Safety Checker",
    inputs=[Input("checker_name", T.COMBO, choices=_checkers,
                  tooltip="diffusers' StableDiffusionSafetyChecker in models/safety_checker: a folder "
                          "(config.json + model.safetensors) or one .safetensors file.")],
    outputs=[Output("SAFETY_CHECKER", SAFETY_CHECKER)],
    validate=validator(FOLDER, "checker_name"),
    fingerprint=fingerprinter(FOLDER, "checker_name"),
)
def safety_checker_loader(ctx, checker_name: str):
    """Load the CLIP-based image safety classifier Stable Diffusion 1.x ships (offline)."""
    handle = open_checker(ctx.env, checker_name)
    ctx.message(f"{checker_name}: safety checker on {model_manager(ctx.env).device}")
    return (handle,)


@define_node(
    "SafetyFilter",
    category="image",
    display_name="Safety Filter",
    inputs=[
        Input("images", T.IMAGE),
        Input("safety_checker", SAFETY_CHECKER),
        Input("mode", T.COMBO, default="blur", choices=list(MODES),
              tooltip="What happens to a flagged image: flag (passed on, only reported), blur (a strong "
                      "Gaussian blur, as Stability's API), black (as diffusers), drop (removed from the batch)."),
    ],
    outputs=[Output("IMAGE", T.IMAGE),
             Output("flags", SAFETY_FLAGS, tooltip="One flag per input image: true where the classifier fired")],
)
def safety_filter(ctx, images, safety_checker, mode: str = "blur"):
    """Classify every image with the safety checker and blur, black out or drop the flagged ones.

    The checker is a classifier: it misses some images and flags some harmless
    ones. The message says how many were flagged; the flags output lists them.
    """
    if mode not in MODES:
        raise NodeError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}", input_name="mode")
    if not isinstance(safety_checker, SafetyCheckerHandle):
        raise NodeError("expected a SAFETY_CHECKER from SafetyCheckerLoader", input_name="safety_checker")
    if getattr(images, "ndim", 0) != 4:
        raise NodeError(f"expected an IMAGE [B,H,W,C], got shape {tuple(getattr(images, 'shape', ()))}",
                        input_name="images")
    result = apply_mode(images, safety_checker.flags(images), mode)
    text = summary(result, mode)
    ctx.message(text)
    return Result(outputs=(result.images, result.flags), ui={"text": [text], "filtered": result.flags})
