"""FLUX nodes with ComfyUI's names and inputs: CLIPTextEncodeFlux, FluxGuidance,
FluxDisableGuidance, ModelSamplingFlux, EmptySD3LatentImage.

The family itself (network, text encoding, flow sampling) is nodes.families.flux
and nodes.samplers.flow; these nodes only set what ComfyUI's set: the distilled
guidance travels on the CONDITIONING (``extra["guidance"]``), the shift on the
MODEL handle's scheduler config.
"""
from __future__ import annotations

import dataclasses

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.conditioning_nodes import with_options
from nodes.handles import ClipHandle, ModelHandle
from nodes.latent_ops import EMPTY_LATENT_SIZE, MAX_RESOLUTION, empty_latent_inputs

#: A FLUX latent is cut into 2x2 patches of an 8x-downscaled image: sizes are multiples of 16 pixels.
FLUX_MULTIPLE = 16


def _guidance_value(guidance: float) -> float:
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        raise NodeError(f"guidance must be a number, got {guidance!r}", "guidance") from None
    if not 0.0 <= value <= 100.0:
        raise NodeError(f"guidance must be within 0..100, got {value}", "guidance")
    return value


@define_node(
    "CLIPTextEncodeFlux",
    category="advanced/conditioning/flux",
    inputs=[
        Input("clip", T.CLIP),
        Input("clip_l", T.STRING, default="", multiline=True, tooltip="The prompt CLIP-L sees (its pooled output)."),
        Input("t5xxl", T.STRING, default="", multiline=True, tooltip="The prompt T5-XXL sees (the token sequence)."),
        Input("guidance", T.FLOAT, default=3.5, min=0.0, max=100.0, step=0.1,
              tooltip="FLUX.1 [dev]'s distilled guidance, a network input (not cfg); [schnell] ignores it."),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode_flux(ctx, clip, clip_l: str, t5xxl: str, guidance: float = 3.5):
    """Encode two prompts (CLIP-L's and T5's) and attach the distilled guidance."""
    from nodes.text import encode_reported

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if not getattr(clip.family, "flow", False) or "tokenizer_2" not in clip.tokenizers:
        raise NodeError(f"clip is a {clip.family.name} text encoder; CLIPTextEncodeFlux needs FLUX's CLIP-L + "
                        "T5 (DualCLIPLoader type flux, or a FLUX checkpoint)", "clip")
    for name, value in (("clip_l", clip_l), ("t5xxl", t5xxl)):
        if not isinstance(value, str):
            raise NodeError(f"{name} must be a string", name)
    value = _guidance_value(guidance)
    cond, _ = encode_reported(ctx, clip, t5xxl, texts={"tokenizer": clip_l, "tokenizer_2": t5xxl})
    return (with_options(cond, "clip", guidance=value),)


@define_node(
    "FluxGuidance",
    category="advanced/conditioning/flux",
    inputs=[
        Input("conditioning", T.CONDITIONING),
        Input("guidance", T.FLOAT, default=3.5, min=0.0, max=100.0, step=0.1,
              tooltip="FLUX.1 [dev]'s distilled guidance; [schnell] ignores it."),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def flux_guidance(ctx, conditioning, guidance: float = 3.5):
    """Set the distilled guidance on every entry of a conditioning."""
    return (with_options(conditioning, guidance=_guidance_value(guidance)),)


@define_node(
    "FluxDisableGuidance",
    category="advanced/conditioning/flux",
    inputs=[Input("conditioning", T.CONDITIONING)],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def flux_disable_guidance(ctx, conditioning):
    """Leave the distilled guidance out of the model's conditioning altogether (not guidance 0,
    which is itself an embedded value): for models trained to run without it."""
    return (with_options(conditioning, guidance=None),)


@define_node(
    "ModelSamplingFlux",
    category="advanced/model",
    inputs=[
        Input("model", T.MODEL),
        Input("max_shift", T.FLOAT, default=1.15, min=0.0, max=100.0, step=0.01),
        Input("base_shift", T.FLOAT, default=0.5, min=0.0, max=100.0, step=0.01),
        Input("width", T.INT, default=1024, min=16, max=MAX_RESOLUTION, step=8),
        Input("height", T.INT, default=1024, min=16, max=MAX_RESOLUTION, step=8),
    ],
    outputs=[Output("MODEL", T.MODEL)],
)
def model_sampling_flux(ctx, model, max_shift: float = 1.15, base_shift: float = 0.5, width: int = 1024,
                        height: int = 1024):
    """Fix the resolution-dependent shift: ``mu`` for width x height, linear from base_shift at
    256 patches to max_shift at 4096 (ComfyUI's rule; without this node Kiln shifts for the
    latent actually sampled, as diffusers' FluxPipeline does)."""
    from nodes.samplers import flow

    if not isinstance(model, ModelHandle) or not flow.is_flow(model.scheduler_config):
        name = getattr(getattr(model, "family", None), "name", type(model).__name__)
        raise NodeError(f"model is {name}, not a flow-matching model (FLUX): ModelSamplingFlux does not apply",
                        "model")
    from nodes.samplers.velocity_rule import FLOW, with_rule

    # a new sampling object in ComfyUI: the flow rule, whatever ModelSamplingAuraFlow set before
    config = dict(with_rule(model.scheduler_config, FLOW), use_dynamic_shifting=True, base_shift=float(base_shift),
                  max_shift=float(max_shift), base_image_seq_len=256, max_image_seq_len=4096)
    config[flow.SHIFT_SEQ_LEN] = int(width) * int(height) / (8 * 8 * 2 * 2)
    return (dataclasses.replace(model, scheduler_config=config),)


@define_node(
    "EmptySD3LatentImage",
    category="latent/sd3",
    inputs=empty_latent_inputs(16),
    outputs=[Output("LATENT", T.LATENT)],
    size=EMPTY_LATENT_SIZE,
    validate=lambda env, inputs: _typed_sizes_off_grid(inputs),
)
def empty_sd3_latent_image(ctx, width: int = 1024, height: int = 1024, batch_size: int = 1):
    """A blank 16-channel latent (SD3 and FLUX): zeros [batch, 16, height/8, width/8].

    A size typed on the node must be a multiple of 16 (FLUX cuts the latent into 2x2 patches), and
    validation says so; a size that arrives through a link (GetImageSize of a picture, as OmniGen2's edit
    template wires it) is floored to whole latent pixels as ComfyUI does, and the family that cannot take
    an odd latent side names it when sampling (nodes.families.input_checks.check_even_latent).
    """
    import torch

    return ({"samples": torch.zeros([int(batch_size), 16, int(height) // 8, int(width) // 8])},)


def _typed_sizes_off_grid(inputs: dict) -> list[tuple[str, str]]:
    """EmptySD3LatentImage's validation: the typed width or height that is not a multiple of 16."""
    return [(name, f"{name} {inputs[name]} is not a multiple of {FLUX_MULTIPLE}: FLUX and SD3 latents are cut into "
                   f"2x2 patches of 8x8 pixels (try {int(inputs[name]) // FLUX_MULTIPLE * FLUX_MULTIPLE})")
            for name in ("width", "height")
            if isinstance(inputs.get(name), int) and inputs[name] % FLUX_MULTIPLE]
