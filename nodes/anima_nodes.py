"""ComfyUI's AnimaLLLiteApply: an Anima LLLite (ModelPatchLoader, ``models/model_patches``) on the MODEL.

The control acts inside the DiT while a sampler runs (nodes.control.anima_lllite), so the node only records it on
the model's SamplingPatches (``lllite``): the loaded network is untouched, and the node's output (and everything
downstream) is a new MODEL whose cache signature carries the patch, the picture and the settings.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.model_patch_nodes import MODEL_PATCH


def _unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise NodeError(f"{name} must be between 0 and 1, got {value:g}", name)
    return value


@define_node(
    "AnimaLLLiteApply",
    category="advanced/model_patches/anima",
    inputs=[Input("model", T.MODEL),
            Input("model_patch", MODEL_PATCH, tooltip="An Anima LLLite (anima-lllite-*.safetensors) through "
                                                      "ModelPatchLoader"),
            Input("image", T.IMAGE, tooltip="The control picture (edges, depth, pose; the picture to inpaint), 0..1"),
            Input("strength", T.FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01),
            Input("start_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
            Input("end_percent", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.001),
            Input("mask", T.MASK, optional=True,
                  tooltip="What to repaint (1), for an inpainting LLLite (4 input channels); others ignore it")],
    outputs=[Output("MODEL", T.MODEL)],
)
def anima_lllite_apply(ctx, model, model_patch, image, strength: float, start_percent: float,
                       end_percent: float, mask: Any = None):
    """The Anima model with the LLLite's corrections on its DiT while it samples, between the two fractions of the
    run (stacked after any LLLite already on it); strength 0 returns the model unchanged."""
    import torch

    from nodes.control.anima_lllite import KIND, LLLiteControl
    from nodes.control.apply import ControlNetHandle
    from nodes.families.cosmos import CosmosPredict2
    from nodes.handles import ModelHandle
    from nodes.samplers.model_sampling import for_model
    from nodes.samplers.schedules import percent_to_sigma

    if not isinstance(model, ModelHandle) or not isinstance(model.family, CosmosPredict2):
        what = model.family.label if isinstance(model, ModelHandle) else type(model).__name__
        raise NodeError(f"AnimaLLLiteApply works on Anima models, got {what}", "model")
    if not isinstance(model_patch, ControlNetHandle) or model_patch.config.get("kind") != KIND:
        what = model_patch.name if isinstance(model_patch, ControlNetHandle) else type(model_patch).__name__
        raise NodeError(f"{what} is not an Anima LLLite: load anima-lllite-*.safetensors with ModelPatchLoader",
                        "model_patch")
    width = int(model.peek().config.num_attention_heads * model.peek().config.attention_head_dim)
    if model_patch.config["model_dim"] != width:
        raise NodeError(f"{model_patch.name} was made for a DiT {model_patch.config['model_dim']} wide and this "
                        f"model's is {width}: use the LLLite made for this Anima", "model_patch")
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise NodeError("image must be an IMAGE [B, H, W, C] with at least 3 channels", "image")
    if mask is not None and model_patch.config["in_channels"] == 4:
        from nodes.masking import as_mask

        mask = as_mask(mask, "mask")
    elif mask is not None:
        ctx.message(f"mask: {model_patch.name} reads no inpainting mask; it is applied without it")
        mask = None
    start, end = _unit("start_percent", start_percent), _unit("end_percent", end_percent)
    if float(strength) == 0.0:
        return (model,)
    schedule = for_model(model).schedule
    control = LLLiteControl(model_patch, image[..., :3].float(), mask, float(strength),
                            percent_to_sigma(schedule, start), percent_to_sigma(schedule, end))
    patches = model.patches
    return (dataclasses.replace(model, patches=dataclasses.replace(patches, lllite=(*patches.lllite, control))),)
