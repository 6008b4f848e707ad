"""CLIPVisionLoader, CLIPVisionEncode, StyleModelLoader and StyleModelApply, with ComfyUI's
names and inputs: FLUX.1 Redux, which turns an image into prompt tokens (image variations,
and style or content from a picture mixed into a prompt).

ComfyUI's graph: LoadImage -> CLIPVisionEncode (with CLIPVisionLoader's SigLIP) ->
StyleModelApply (the prompt's conditioning, StyleModelLoader's Redux, strength) ->
FluxGuidance -> KSampler. The encoders belong to the model manager like every model;
reading the files and ComfyUI's pixel rule are nodes/vision_models.py, the attention bias
of ``strength_type`` attn_bias nodes/families/attention_bias.py.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.conditioning_nodes import COND, _entries
from nodes.loaders import fingerprinter, list_models, validator
from nodes.managed_modules import ModuleHandle, acquire_module

VISION_FOLDER = "clip_vision"
STYLE_FOLDER = "style_models"
CLIP_VISION = "CLIP_VISION"
CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
STYLE_MODEL = "STYLE_MODEL"
STRENGTH_TYPES = ["multiply", "attn_bias"]


def _acquire(ctx, folder: str, name: str, input_name: str, kind: str, load: Callable) -> ModuleHandle:
    from nodes.checkpoint.load import CheckpointError

    return acquire_module(ctx, folder, name, input_name, kind, load, (CheckpointError,))


@define_node(
    "CLIPVisionLoader",
    category="loaders",
    display_name="Load CLIP Vision",
    inputs=[Input("clip_name", T.COMBO, choices=lambda env: list_models(env, VISION_FOLDER, diffusers_marker=None),
                  tooltip="An image encoder in models/clip_vision (FLUX.1 Redux's "
                          "sigclip_vision_patch14_384.safetensors, or a CLIP ViT-L/H/bigG for unCLIP)")],
    outputs=[Output("CLIP_VISION", CLIP_VISION)],
    validate=validator(VISION_FOLDER, "clip_name"),
    fingerprint=fingerprinter(VISION_FOLDER, "clip_name"),
)
def clip_vision_loader(ctx, clip_name: str):
    """Load an image encoder (SigLIP, or a CLIP ViT in transformers' or OpenCLIP's layout); its sizes come
    from the file."""
    from nodes.vision_models import load_vision

    handle = _acquire(ctx, VISION_FOLDER, clip_name, "clip_name", "clip_vision", load_vision)
    ctx.message(f"{clip_name}: {handle.loaded.kind} image encoder, {handle.loaded.image_size} px")
    return (handle,)


@define_node(
    "CLIPVisionEncode",
    category="conditioning",
    inputs=[Input("clip_vision", CLIP_VISION), Input("image", T.IMAGE),
            Input("crop", T.COMBO, choices=["center", "none"],
                  tooltip="center: scale the shorter side to the encoder's size and cut the centre; none: squash "
                          "the whole image to a square")],
    outputs=[Output("CLIP_VISION_OUTPUT", CLIP_VISION_OUTPUT)],
)
def clip_vision_encode(ctx, clip_vision: Any, image: Any, crop: str):
    """Encode each image of the batch into the encoder's token states."""
    from nodes.masking import as_image
    from nodes.vision_models import LoadedVision, encode

    if not isinstance(clip_vision, ModuleHandle) or not isinstance(clip_vision.loaded, LoadedVision):
        raise NodeError(f"must come from CLIPVisionLoader, got {type(clip_vision).__name__}", "clip_vision")
    if crop not in ("center", "none"):
        raise NodeError(f"must be center or none, got {crop!r}", "crop")
    image = as_image(image)
    with clip_vision.module() as model:
        return (encode(clip_vision.loaded, model, image, crop == "center"),)


@define_node(
    "StyleModelLoader",
    category="loaders",
    display_name="Load Style Model",
    inputs=[Input("style_model_name", T.COMBO,
                  choices=lambda env: list_models(env, STYLE_FOLDER, diffusers_marker=None),
                  tooltip="A style model in models/style_models (FLUX.1 Redux's flux1-redux-dev.safetensors)")],
    outputs=[Output("STYLE_MODEL", STYLE_MODEL)],
    validate=validator(STYLE_FOLDER, "style_model_name"),
    fingerprint=fingerprinter(STYLE_FOLDER, "style_model_name"),
)
def style_model_loader(ctx, style_model_name: str):
    """Load FLUX.1 Redux's projector from SigLIP tokens to prompt tokens."""
    from nodes.vision_models import load_style_model

    return (_acquire(ctx, STYLE_FOLDER, style_model_name, "style_model_name", "style_model", load_style_model),)


@define_node(
    "StyleModelApply",
    category="conditioning/style_model",
    display_name="Apply Style Model",
    inputs=[Input("conditioning", T.CONDITIONING), Input("style_model", STYLE_MODEL),
            Input("clip_vision_output", CLIP_VISION_OUTPUT),
            Input("strength", T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.001),
            Input("strength_type", T.COMBO, choices=STRENGTH_TYPES,
                  tooltip="multiply: scale the image tokens; attn_bias: shift the attention paid to them by "
                          "log(strength), which weakens them more evenly")],
    outputs=COND,
)
def style_model_apply(ctx, conditioning: Any, style_model: Any, clip_vision_output: Any, strength: float,
                      strength_type: str):
    """Append the image's tokens (one run of tokens per image of the batch) to every entry's prompt."""
    import torch

    from nodes.families import attention_bias
    from nodes.vision_models import LoadedStyleModel, VisionOutput

    if not isinstance(style_model, ModuleHandle) or not isinstance(style_model.loaded, LoadedStyleModel):
        raise NodeError(f"must come from StyleModelLoader, got {type(style_model).__name__}", "style_model")
    if not isinstance(clip_vision_output, VisionOutput):
        raise NodeError(f"must come from CLIPVisionEncode, got {type(clip_vision_output).__name__}",
                        "clip_vision_output")
    if strength_type not in STRENGTH_TYPES:
        raise NodeError(f"must be one of {', '.join(STRENGTH_TYPES)}, got {strength_type!r}", "strength_type")
    strength = float(strength)
    if not 0.0 <= strength <= 10.0:
        raise NodeError(f"must be within 0..10, got {strength}", "strength")
    states = clip_vision_output.last_hidden_state
    with style_model.module() as model, torch.inference_mode():
        width = model.redux_up.in_features
        if states.shape[-1] != width:
            raise NodeError(f"holds {states.shape[-1]}-wide image tokens but {style_model.name} takes {width} "
                            "(encode the image with the SigLIP encoder Redux was trained with)", "clip_vision_output")
        param = next(model.parameters())
        tokens = model(states.to(param.device, param.dtype)).image_embeds.to("cpu", torch.float32)
    tokens = tokens.reshape(1, -1, tokens.shape[-1])
    if strength_type == "multiply":
        tokens = tokens * strength
    bias = (math.log(strength) if strength > 0 else -math.inf) if strength_type == "attn_bias" else 0.0
    out = []
    for embeds, extra in _entries(conditioning, "conditioning"):
        if embeds.shape[-1] != tokens.shape[-1]:
            raise NodeError(f"its prompt tokens are {embeds.shape[-1]} wide but {style_model.name} makes "
                            f"{tokens.shape[-1]}-wide tokens: Redux needs a FLUX prompt (T5-XXL)", "conditioning")
        if attention_bias.KEY in extra or (strength_type == "attn_bias" and strength != 1.0):
            extra[attention_bias.KEY] = attention_bias.append(extra.get(attention_bias.KEY), embeds.shape[1],
                                                              tokens.shape[1], bias)
        out.append([torch.cat([embeds, tokens.to(embeds.dtype)], dim=1), extra])
    return (out,)
