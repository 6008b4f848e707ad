"""ComfyUI's model-merging nodes: ModelMergeSimple, ModelMergeBlocks, ModelMergeAdd,
ModelMergeSubtract, CLIPMergeSimple, CLIPMergeAdd and CLIPMergeSubtract.

Each returns the first handle with one merge entry on its patch stack (nodes.runtime.merge):
no third model is built, the first model samples as before on every other path, and the
merge is applied while the merged handle is in use. ComfyUI's arithmetic: a simple merge is
ratio * model1 + (1 - ratio) * model2 (ratio 1: model1 itself), an add model1 + model2, a
subtract multiplier * (model1 - model2). Weights the two models do not share, or share with
other shapes (an inpainting model's input layer), stay model1's (a node message counts them);
models of two families are refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle, ModelHandle

CATEGORY = "advanced/model_merging"
#: Text-encoder entries ComfyUI's CLIP merges leave alone (buffers and the contrastive temperature).
CLIP_KEPT = (".position_ids", ".logit_scale")


def _shapes(network: Any) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in network.named_parameters()}


def _table(ctx, label: str, first: Any, second: Any, ratio_of: Callable[[str], tuple[float, float]],
           skip: Callable[[str], bool] = lambda name: False) -> dict:
    from nodes.runtime.merge import table

    patches, differing = table(_shapes(first), _shapes(second), ratio_of, skip)
    if differing:
        ctx.message(f"{label}: {len(differing)} weights have other shapes in the second model and keep the "
                    f"first's (e.g. {', '.join(differing[:3])})")
    return patches


def _same_family(first: Any, second: Any, input_name: str) -> None:
    """Refuse models of two families: their networks may share names and even shapes (a tiny SD1
    and SDXL share most), so ComfyUI would blend them, but the result is no model of either."""
    if first.name != second.name:
        raise NodeError(f"{input_name} is a {second.name} model and the first a {first.name} one: only models of "
                        "one family merge", input_name)


def merge_models(ctx, model1: Any, model2: Any, label: str, ratio_of: Callable[[str], tuple[float, float]]):
    """model1's handle with the merge of model2's weights at ``ratio_of(name)`` = (own, other)."""
    from nodes.runtime.patches import LoraEntry

    for value, name in ((model1, "model1"), (model2, "model2")):
        if not isinstance(value, ModelHandle):
            raise NodeError(f"{name} must come from a model loader, got {type(value).__name__}", name)
    _same_family(model1.family, model2.family, "model2")
    patches = _table(ctx, label, model1.peek(), model2.peek(), ratio_of)
    if not patches:
        raise NodeError(f"model2 shares no weight with model1 ({model1.family.name})", "model2")
    ctx.message(f"{label}: {len(patches)} weights merged")
    entry = LoraEntry(label, 1.0, {"unet": patches}, sources={"unet": model2.unet})
    return (dataclasses.replace(model1, loras=(*model1.loras, entry)),)


def merge_clips(ctx, clip1: Any, clip2: Any, label: str, own: float, other: float):
    """clip1's handle with each text encoder both have merged at (own, other)."""
    from nodes.runtime.patches import LoraEntry

    for value, name in ((clip1, "clip1"), (clip2, "clip2")):
        if not isinstance(value, ClipHandle):
            raise NodeError(f"{name} must come from a checkpoint or CLIP loader, got {type(value).__name__}", name)
    _same_family(clip1.family, clip2.family, "clip2")
    theirs = {spec.module for spec in clip2.family.text_encoders}
    tables, sources = {}, {}
    for spec in clip1.family.text_encoders:
        if spec.module not in theirs:
            continue
        patches = _table(ctx, f"{label} ({spec.module})", clip1.peek(spec.module), clip2.peek(spec.module),
                         lambda name: (own, other), skip=lambda name: name.endswith(CLIP_KEPT))
        if patches:
            tables[spec.module] = patches
            sources[spec.module] = lambda module=spec.module: clip2.encoder(module)
    if not tables:
        raise NodeError(f"clip2 ({clip2.family.name}) shares no text-encoder weight with clip1 "
                        f"({clip1.family.name})", "clip2")
    ctx.message(f"{label}: " + ", ".join(f"{len(t)} weights of {m}" for m, t in tables.items()) + " merged")
    entry = LoraEntry(label, 1.0, tables, sources=sources)
    return (dataclasses.replace(clip1, loras=(*clip1.loras, entry)),)


def _ratio(name: str = "ratio") -> Input:
    return Input(name, T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)


def _multiplier() -> Input:
    return Input("multiplier", T.FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01)


MODELS = [Input("model1", T.MODEL), Input("model2", T.MODEL)]
CLIPS = [Input("clip1", T.CLIP), Input("clip2", T.CLIP)]


@define_node("ModelMergeSimple", category=CATEGORY, inputs=[*MODELS, _ratio()], outputs=[Output("MODEL", T.MODEL)])
def model_merge_simple(ctx, model1, model2, ratio: float):
    """ratio * model1 + (1 - ratio) * model2, weight by weight."""
    r = float(ratio)
    return merge_models(ctx, model1, model2, f"ModelMergeSimple {r:g}", lambda name: (r, 1.0 - r))


def block_of(name: str) -> str:
    """ComfyUI's ModelMergeBlocks groups by the original UNet's prefixes (input_blocks,
    middle_block, output_blocks and out); in diffusers' names those are the encoder side, the
    middle block and the decoder side. Every other weight (time embedding, a transformer's)
    takes ``input``'s ratio, ComfyUI's default."""
    if name.startswith("mid_block."):
        return "middle"
    if name.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")):
        return "out"
    return "input"


@define_node("ModelMergeBlocks", category=CATEGORY,
             inputs=[*MODELS, _ratio("input"), _ratio("middle"), _ratio("out")], outputs=[Output("MODEL", T.MODEL)])
def model_merge_blocks(ctx, model1, model2, input: float, middle: float, out: float):  # noqa: A002 (ComfyUI's name)
    """A simple merge with its own ratio for the UNet's encoder side, middle block and decoder side."""
    ratios = {"input": float(input), "middle": float(middle), "out": float(out)}

    def ratio_of(name: str) -> tuple[float, float]:
        r = ratios[block_of(name)]
        return r, 1.0 - r

    label = "ModelMergeBlocks " + "/".join(f"{v:g}" for v in ratios.values())
    return merge_models(ctx, model1, model2, label, ratio_of)


@define_node("ModelMergeAdd", category=CATEGORY, inputs=MODELS, outputs=[Output("MODEL", T.MODEL)])
def model_merge_add(ctx, model1, model2):
    """model1 + model2 (e.g. a difference made by ModelMergeSubtract added to another model)."""
    return merge_models(ctx, model1, model2, "ModelMergeAdd", lambda name: (1.0, 1.0))


@define_node("ModelMergeSubtract", category=CATEGORY, inputs=[*MODELS, _multiplier()],
             outputs=[Output("MODEL", T.MODEL)])
def model_merge_subtract(ctx, model1, model2, multiplier: float):
    """multiplier * (model1 - model2): what model1 adds to model2, for ModelMergeAdd."""
    m = float(multiplier)
    return merge_models(ctx, model1, model2, f"ModelMergeSubtract {m:g}", lambda name: (m, -m))


@define_node("CLIPMergeSimple", category=CATEGORY, inputs=[*CLIPS, _ratio()], outputs=[Output("CLIP", T.CLIP)])
def clip_merge_simple(ctx, clip1, clip2, ratio: float):
    """ratio * clip1 + (1 - ratio) * clip2 for each text encoder both have."""
    r = float(ratio)
    return merge_clips(ctx, clip1, clip2, f"CLIPMergeSimple {r:g}", r, 1.0 - r)


@define_node("CLIPMergeAdd", category=CATEGORY, inputs=CLIPS, outputs=[Output("CLIP", T.CLIP)])
def clip_merge_add(ctx, clip1, clip2):
    """clip1 + clip2."""
    return merge_clips(ctx, clip1, clip2, "CLIPMergeAdd", 1.0, 1.0)


@define_node("CLIPMergeSubtract", category=CATEGORY, inputs=[*CLIPS, _multiplier()], outputs=[Output("CLIP", T.CLIP)])
def clip_merge_subtract(ctx, clip1, clip2, multiplier: float):
    """multiplier * (clip1 - clip2)."""
    m = float(multiplier)
    return merge_clips(ctx, clip1, clip2, f"CLIPMergeSubtract {m:g}", m, -m)
