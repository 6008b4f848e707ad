"""ComfyUI's speed patches on a MODEL: EasyCache and LazyCache (skip model evaluations whose
output is predictable, nodes.families.step_cache) and HyperTile (the UNet's self-attention
computed in tiles, nodes.families.hypertile) and TomePatchModel (token merging in it,
nodes.families.tome).

Each returns a new MODEL handle with the setting recorded on its sampling patches (the handle
it was given, and every cached result built on it, samples as before); the sampling loop
applies it and KSampler's messages say how many evaluations were skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node


def _in_range(name: str, value: float, low: float, high: float) -> float:
    value = float(value)
    if not low <= value <= high:
        raise NodeError(f"{name} must be between {low:g} and {high:g}, got {value:g}", name)
    return value


def _cache_inputs(what: str) -> list[Input]:
    return [Input("model", T.MODEL, tooltip=f"The model to add {what} to."),
            Input("reuse_threshold", T.FLOAT, default=0.2, min=0.0, max=3.0, step=0.01,
                  tooltip="Accumulated predicted output change below which a step reuses the cache."),
            Input("start_percent", T.FLOAT, default=0.15, min=0.0, max=1.0, step=0.01,
                  tooltip=f"Point of the run from which {what} may skip steps."),
            Input("end_percent", T.FLOAT, default=0.95, min=0.0, max=1.0, step=0.01,
                  tooltip="Point of the run after which every step runs again."),
            Input("verbose", T.BOOLEAN, default=False, tooltip="Log each step's decision.")]


def _cached(model, kind: str, reuse_threshold: float, start_percent: float, end_percent: float, verbose: bool):
    from nodes.families.step_cache import StepCacheSettings
    from nodes.handles import ModelHandle

    if not isinstance(model, ModelHandle):
        raise NodeError(f"model must be a MODEL, got {type(model).__name__}", "model")
    settings = StepCacheSettings(kind, _in_range("reuse_threshold", reuse_threshold, 0.0, 3.0),
                                 _in_range("start_percent", start_percent, 0.0, 1.0),
                                 _in_range("end_percent", end_percent, 0.0, 1.0), bool(verbose))
    return (dataclasses.replace(model, patches=dataclasses.replace(model.patches, step_cache=settings)),)


@define_node("EasyCache", category="advanced/debug/model", inputs=_cache_inputs("EasyCache"),
             outputs=[Output("MODEL", T.MODEL)])
def easy_cache(ctx, model, reuse_threshold: float, start_percent: float, end_percent: float, verbose: bool):
    """EasyCache: inside the window, a network call whose output change (estimated from its input's
    change at the last measured rate) adds up to less than the threshold is skipped and answered
    from the cached output - input difference. Fewer network passes, a close image."""
    return _cached(model, "EasyCache", reuse_threshold, start_percent, end_percent, verbose)


@define_node("LazyCache", category="advanced/debug/model", inputs=_cache_inputs("LazyCache"),
             outputs=[Output("MODEL", T.MODEL)])
def lazy_cache(ctx, model, reuse_threshold: float, start_percent: float, end_percent: float, verbose: bool):
    """LazyCache: EasyCache's rule on the whole guided prediction rather than each network call,
    so it works under any guider (DualCFGGuider, PerpNegGuider); usually a little worse than EasyCache."""
    return _cached(model, "LazyCache", reuse_threshold, start_percent, end_percent, verbose)


@define_node("HyperTile", category="model_patches/unet",
             inputs=[Input("model", T.MODEL), Input("tile_size", T.INT, default=256, min=1, max=2048),
                     Input("swap_size", T.INT, default=2, min=1, max=128),
                     Input("max_depth", T.INT, default=0, min=0, max=10),
                     Input("scale_depth", T.BOOLEAN, default=False)],
             outputs=[Output("MODEL", T.MODEL)])
def hypertile(ctx, model, tile_size: int, swap_size: int, max_depth: int, scale_depth: bool):
    """HyperTile: the UNet's self-attention at its largest feature sizes computed on tiles of about
    ``tile_size`` pixels (nodes.families.hypertile), which speeds up large images. UNet families only."""
    from nodes.families.hypertile import HyperTileSettings

    unet_model(model, "HyperTile")
    values = {}
    for name, value, low, high in (("tile_size", tile_size, 1, 2048), ("swap_size", swap_size, 1, 128),
                                   ("max_depth", max_depth, 0, 10)):
        if isinstance(value, bool) or int(value) != value or not low <= int(value) <= high:
            raise NodeError(f"{name} must be a whole number from {low} to {high}, got {value!r}", name)
        values[name] = int(value)
    settings = HyperTileSettings(scale_depth=bool(scale_depth), **values)
    return (dataclasses.replace(model, patches=dataclasses.replace(model.patches, hypertile=settings)),)


@define_node("TomePatchModel", category="model_patches/unet",
             inputs=[Input("model", T.MODEL), Input("ratio", T.FLOAT, default=0.3, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("MODEL", T.MODEL)])
def tome_patch_model(ctx, model, ratio: float):
    """Token merging: the UNet's full-size self-attention attends with the ``ratio`` most redundant
    queries merged into their neighbours (nodes.families.tome); faster, slightly softer. 0 changes
    nothing. UNet families only."""
    from nodes.families.tome import TomeSettings

    unet_model(model, "TomePatchModel")
    settings = TomeSettings(_in_range("ratio", ratio, 0.0, 1.0))
    return (dataclasses.replace(model, patches=dataclasses.replace(model.patches, tome=settings)),)


def unet_model(model: Any, patch: str) -> None:
    """Refuse anything but a MODEL whose network is a UNet (nodes.families.unet_network), naming
    ``model``; ``patch`` is the node's name, for the message."""
    from nodes.families.base import ConditioningError
    from nodes.families.unet_network import unet_of
    from nodes.handles import ModelHandle

    if not isinstance(model, ModelHandle):
        raise NodeError(f"model must be a MODEL, got {type(model).__name__}", "model")
    try:
        unet_of(model.peek(), patch)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
