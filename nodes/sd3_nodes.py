"""SD3.5 nodes with ComfyUI's names and inputs: TripleCLIPLoader, CLIPTextEncodeSD3, ModelSamplingSD3
(and ModelSamplingAuraFlow, its twin for any flow model), SkipLayerGuidanceSD3.

The family (network, text encoding, flow sampling) is nodes.families.sd3; these
nodes only choose what ComfyUI's choose: which encoder files, which prompt each
encoder sees, the shift on the MODEL handle's scheduler config.
(EmptySD3LatentImage is in nodes.flux_nodes: FLUX uses it too.)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.families.sd3 import SD3
from nodes.handles import ClipHandle, ModelHandle
from nodes.split_loaders import _clip, _texts, texts_fingerprint, texts_validator
from nodes.samplers.velocity_rule import CHOICES, FLOW, with_rule

CLIP_INPUTS = ("clip_name1", "clip_name2", "clip_name3")
#: The family TripleCLIPLoader loads (ComfyUI's recipe: clip-l, clip-g, t5).
TRIPLE_TYPE = "sd3"


@define_node(
    "TripleCLIPLoader",
    category="advanced/loaders",
    display_name="TripleCLIPLoader",
    inputs=[Input(name, T.COMBO, choices=_texts,
                  tooltip="SD3's text encoders: clip_l, clip_g and t5xxl files, in any order.")
            for name in CLIP_INPUTS],
    outputs=[Output("CLIP", T.CLIP)],
    validate=texts_validator(CLIP_INPUTS),
    fingerprint=texts_fingerprint(CLIP_INPUTS),
)
def triple_clip_loader(ctx, clip_name1: str, clip_name2: str, clip_name3: str):
    """Load SD3's three text encoders from three files (told apart by their shapes)."""
    return (_clip(ctx, list(zip(CLIP_INPUTS, (clip_name1, clip_name2, clip_name3))), TRIPLE_TYPE),)


@define_node(
    "CLIPTextEncodeSD3",
    category="advanced/conditioning",
    inputs=[
        Input("clip", T.CLIP),
        Input("clip_l", T.STRING, default="", multiline=True, tooltip="The prompt CLIP-L sees."),
        Input("clip_g", T.STRING, default="", multiline=True, tooltip="The prompt CLIP-G (bigG) sees."),
        Input("t5xxl", T.STRING, default="", multiline=True, tooltip="The prompt T5-XXL sees."),
        Input("empty_padding", T.COMBO, default="none", choices=["none", "empty_prompt"],
              tooltip="none: an encoder given an empty prompt is left out (zeros for both CLIPs when both are "
                      "empty; no T5 tokens); empty_prompt: it encodes the empty prompt."),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode_sd3(ctx, clip, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str = "none"):
    """Encode one prompt per SD3 encoder."""
    from nodes.text import encode_reported

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if not isinstance(clip.family, SD3):
        raise NodeError(f"clip is a {clip.family.name} text encoder; CLIPTextEncodeSD3 needs SD3's (TripleCLIPLoader, "
                        "or an SD3 checkpoint)", "clip")
    for name, value in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl)):
        if not isinstance(value, str):
            raise NodeError(f"{name} must be a string", name)
    if empty_padding not in ("none", "empty_prompt"):
        raise NodeError("empty_padding must be none or empty_prompt", "empty_padding")
    texts = {"tokenizer": clip_l, "tokenizer_2": clip_g, "tokenizer_3": t5xxl, "empty_padding": empty_padding}
    cond, _ = encode_reported(ctx, clip, clip_g, texts=texts)
    return (cond,)


@define_node(
    "ModelSamplingSD3",
    category="advanced/model",
    inputs=[
        Input("model", T.MODEL),
        Input("shift", T.FLOAT, default=3.0, min=0.0, max=100.0, step=0.01),
    ],
    outputs=[Output("MODEL", T.MODEL)],
)
def model_sampling_sd3(ctx, model, shift: float = 3.0):
    """A flow model sampled with a fixed ``shift`` (``shift * t / (1 + (shift - 1) t)`` on the grid);
    no resolution-dependent shift."""
    return (with_fixed_shift("ModelSamplingSD3", model, shift),)


@define_node(
    "ModelSamplingAuraFlow",
    category="advanced/model",
    inputs=[
        Input("model", T.MODEL),
        Input("shift", T.FLOAT, default=1.73, min=0.0, max=100.0, step=0.01),
        Input("sampling", T.COMBO, choices=list(CHOICES), default=FLOW, optional=True,
              tooltip="flow: the flow-matching rule. img_to_img_velocity: the output is the whole way to the "
                      "clean latent (denoised = x - v) and no noise is mixed in (Marigold v2's fine-tunes)."),
    ],
    outputs=[Output("MODEL", T.MODEL)],
)
def model_sampling_aura_flow(ctx, model, shift: float = 1.73, sampling: str = FLOW):
    """ModelSamplingSD3 with AuraFlow's default shift, which ComfyUI's templates use on flow models
    (Chroma's among them). ComfyUI's only other difference, the timestep scale its networks take
    (0..1 rather than 0..1000), is each Kiln family's own business, so the schedule is the same.
    ``sampling`` (ComfyUI's later, optional input; older files carry the shift alone and get "flow")
    picks how the output and the start are read: nodes.samplers.velocity_rule."""
    return (with_fixed_shift("ModelSamplingAuraFlow", model, shift, sampling),)


def with_fixed_shift(node_type: str, model: Any, shift: Any, sampling: Any = FLOW) -> Any:
    """``model`` sampled with a fixed shift and the ``sampling`` rule (nodes.samplers.velocity_rule);
    refused on a model that is not flow-matching."""
    from nodes.samplers import flow

    if not isinstance(model, ModelHandle) or not flow.is_flow(model.scheduler_config):
        name = getattr(getattr(model, "family", None), "name", type(model).__name__)
        raise NodeError(f"model is {name}, not a flow-matching model (SD3, FLUX, Chroma): {node_type} does not apply",
                        "model")
    try:
        value = float(shift)
    except (TypeError, ValueError):
        raise NodeError(f"shift must be a number, got {shift!r}", "shift") from None
    if not 0.0 < value <= 100.0:
        raise NodeError(f"shift must be within (0, 100], got {value}", "shift")
    if sampling not in CHOICES:
        raise NodeError(f"sampling must be one of {', '.join(CHOICES)}, got {sampling!r}", "sampling")
    config = {k: v for k, v in with_rule(model.scheduler_config, sampling).items() if k != flow.SHIFT_SEQ_LEN}
    config.update(shift=value, use_dynamic_shifting=False, shift_terminal=None)  # ComfyUI's fixed shift has no stretch
    return dataclasses.replace(model, scheduler_config=config)


@define_node(
    "SkipLayerGuidanceSD3",
    category="advanced/guidance",
    inputs=[
        Input("model", T.MODEL),
        Input("layers", T.STRING, default="7, 8, 9",
              tooltip="Joint blocks left out of the extra pass (numbers, any separators)."),
        Input("scale", T.FLOAT, default=3.0, min=0.0, max=10.0, step=0.1),
        Input("start_percent", T.FLOAT, default=0.01, min=0.0, max=1.0, step=0.001),
        Input("end_percent", T.FLOAT, default=0.15, min=0.0, max=1.0, step=0.001),
    ],
    outputs=[Output("MODEL", T.MODEL)],
)
def skip_layer_guidance_sd3(ctx, model, layers: str = "7, 8, 9", scale: float = 3.0, start_percent: float = 0.01,
                            end_percent: float = 0.15):
    """ComfyUI's SkipLayerGuidanceDiT with the joint ("double") blocks ``layers`` (the shared patch in
    nodes.model_patches, nodes.families.skip_layers): the guided prediction pushed from a conditional
    pass with those blocks left out, between start_percent and end_percent of the schedule."""
    from nodes.model_patches import skip_layers_patched

    if not isinstance(layers, str):
        raise NodeError("layers must be a string of block numbers", "layers")
    return skip_layers_patched(model, layers, "", names=("layers", "layers"), say=ctx.message,
                               start_percent=float(start_percent),
                               end_percent=float(end_percent), scale=float(scale))
