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
        whole1, whole2 = clip1.peek_whole(spec.module), clip2.peek_whole(spec.module)  # towers included
        patches = _table(ctx, f"{label} ({spec.module})", whole1, whole2,
                         lambda name: (own, other), skip=lambda name: name.endswith(CLIP_KEPT))
        if patches:
            tables[spec.module] = patches
            sources[spec.module] = lambda module=spec.module: clip2.whole_encoder(module)  # towers, rebuilt
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


def merge_by_blocks(ctx, model1: Any, model2: Any, label: str, ratios: dict[str, float]):
    """ComfyUI's ModelMergeBlocks rule: a weight takes the ratio of the longest argument its
    original-layout name starts with (``input`` matches ``input_blocks.*``, ``out`` both
    ``output_blocks.*`` and ``out.*``), the first argument's when none does."""
    if not isinstance(model1, ModelHandle):
        raise NodeError(f"model1 must come from a model loader, got {type(model1).__name__}", "model1")
    names = model1.family.merge_names(model1.peek())
    first = next(iter(ratios.values()))

    def ratio_of(name: str) -> tuple[float, float]:
        original = names.get(name, name)
        best = max((arg for arg in ratios if original.startswith(arg)), key=len, default=None)
        r = ratios[best] if best is not None else first
        return r, 1.0 - r

    return merge_models(ctx, model1, model2, label, ratio_of)


@define_node("ModelMergeBlocks", category=CATEGORY,
             inputs=[*MODELS, _ratio("input"), _ratio("middle"), _ratio("out")], outputs=[Output("MODEL", T.MODEL)])
def model_merge_blocks(ctx, model1, model2, input: float, middle: float, out: float):  # noqa: A002 (ComfyUI's name)
    """A simple merge with its own ratio for the UNet's input blocks, middle block and output blocks."""
    ratios = {"input": float(input), "middle": float(middle), "out": float(out)}
    label = "ModelMergeBlocks " + "/".join(f"{v:g}" for v in ratios.values())
    return merge_by_blocks(ctx, model1, model2, label, ratios)


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


# -- ComfyUI's model-specific block merges: one ratio per block of the original layout ---------------

SD1_BLOCKS = ("time_embed.", "label_emb.", *(f"input_blocks.{i}." for i in range(12)),
              *(f"middle_block.{i}." for i in range(3)), *(f"output_blocks.{i}." for i in range(12)), "out.")
SDXL_BLOCKS = ("time_embed.", "label_emb.", *(f"input_blocks.{i}" for i in range(9)),
               *(f"middle_block.{i}" for i in range(3)), *(f"output_blocks.{i}" for i in range(9)), "out.")
FLUX_BLOCKS = ("img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in.",
               *(f"double_blocks.{i}." for i in range(19)), *(f"single_blocks.{i}." for i in range(38)),
               "final_layer.")
SD3_EMBEDDERS = ("pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder.")
SD3_2B_BLOCKS = (*SD3_EMBEDDERS, *(f"joint_blocks.{i}." for i in range(24)), "final_layer.")
SD35_LARGE_BLOCKS = (*SD3_EMBEDDERS, *(f"joint_blocks.{i}." for i in range(38)), "final_layer.")
#: Qwen-Image's 60 blocks (ComfyUI's keys are diffusers' names); its final norm is under none, so it takes
#: the first ratio, as in ComfyUI
QWEN_IMAGE_BLOCKS = ("pos_embeds.", "img_in.", "txt_norm.", "txt_in.", "time_text_embed.",
                     *(f"transformer_blocks.{i}." for i in range(60)), "proj_out.")
#: Wan 2.1's: 40 blocks (14B; 1.3B has 30), ``img_emb.`` on image-to-video models (ChronoEdit)
WAN21_BLOCKS = ("patch_embedding.", "time_embedding.", "time_projection.", "text_embedding.", "img_emb.",
                *(f"blocks.{i}." for i in range(40)), "head.")

#: Cosmos Predict2's (and Anima's DiT's) original layout: 28 blocks (2B), 36 (14B); Anima's ``llm_adapter.`` is
#: under none, so it takes the first ratio, as in ComfyUI
COSMOS_EMBEDDERS = ("pos_embedder.", "x_embedder.", "t_embedder.", "t_embedding_norm.")
COSMOS_2B_BLOCKS = (*COSMOS_EMBEDDERS, *(f"blocks.{i}." for i in range(28)), "final_layer.")
COSMOS_14B_BLOCKS = (*COSMOS_EMBEDDERS, *(f"blocks.{i}." for i in range(36)), "final_layer.")


def _per_block(node_type: str, blocks: tuple[str, ...], families: tuple[str, ...]):
    """A ComfyUI ModelMerge<family> node: ModelMergeBlocks' rule with one ratio per block (input
    names as ComfyUI spells them, dots and all, so they reach the function as keywords)."""
    def merge(ctx, model1, model2, **ratios):
        if isinstance(model1, ModelHandle) and model1.family.name not in families:
            raise NodeError(f"{node_type} merges {' or '.join(families)} models; model1 is a {model1.family.name} one",
                            "model1")
        return merge_by_blocks(ctx, model1, model2, node_type, {block: float(ratios[block]) for block in blocks})

    merge.__doc__ = (f"A simple merge of two {' or '.join(families)} models with a ratio per block of the original "
                     "layout (model1's share; a weight outside every named block takes the first one's).")
    return define_node(node_type, category=f"{CATEGORY}/model_specific", inputs=[*MODELS, *map(_ratio, blocks)],
                       outputs=[Output("MODEL", T.MODEL)])(merge)


model_merge_sd1 = _per_block("ModelMergeSD1", SD1_BLOCKS, ("sd1", "sd2"))
model_merge_sd2 = _per_block("ModelMergeSD2", SD1_BLOCKS, ("sd1", "sd2"))  # ComfyUI: the same blocks as SD1
model_merge_sdxl = _per_block("ModelMergeSDXL", SDXL_BLOCKS, ("sdxl", "sdxl-refiner"))
model_merge_flux1 = _per_block("ModelMergeFlux1", FLUX_BLOCKS, ("flux", "flux-schnell"))
model_merge_sd3_2b = _per_block("ModelMergeSD3_2B", SD3_2B_BLOCKS, ("sd3",))  # SD3 Medium's 24 joint blocks
model_merge_sd35_large = _per_block("ModelMergeSD35_Large", SD35_LARGE_BLOCKS, ("sd3",))
model_merge_qwen_image = _per_block("ModelMergeQwenImage", QWEN_IMAGE_BLOCKS, ("qwen_image", "qwen_image_layered"))
model_merge_wan2_1 = _per_block("ModelMergeWAN2_1", WAN21_BLOCKS, ("wan21",))
model_merge_cosmos_predict2_2b = _per_block("ModelMergeCosmosPredict2_2B", COSMOS_2B_BLOCKS,
                                            ("cosmos_predict2", "anima"))
model_merge_cosmos_predict2_14b = _per_block("ModelMergeCosmosPredict2_14B", COSMOS_14B_BLOCKS, ("cosmos_predict2",))
