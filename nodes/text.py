"""CLIPTextEncode, CLIPSetLastLayer and T5TokenizerOptions: text -> CONDITIONING through the
checkpoint's text encoder(s).

The prompt syntax is nodes.prompt_syntax's and the encoding nodes.families.text's
(so it can be compared one-to-one with diffusers' ``encode_prompt``); these nodes
add the user-facing checks and messages. torch is imported only when a prompt is encoded.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle

if TYPE_CHECKING:
    from nodes.families.text import Report

#: ComfyUI's range for CLIPSetLastLayer (OpenCLIP bigG has 32 layers, but ComfyUI stops at -24).
DEEPEST_LAYER = -24


def _clip(clip: object) -> ClipHandle:
    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a checkpoint or CLIP loader, got {type(clip).__name__}",
                        input_name="clip")
    return clip


def encode_reported(ctx, clip: ClipHandle, text: str, texts: dict[str, str] | None = None) -> tuple[list, "Report"]:
    """(CONDITIONING, report) for a prompt, every text-encoding node's one way in: a layer
    CLIPSetLastLayer asked for that the encoder lacks is an error on ``clip``, and each prompt
    problem (an unbalanced parenthesis, an unread weight, a left-out embedding) is a node message."""
    from nodes.families.base import ConditioningError
    from nodes.families.text import LayerError, Report

    report = Report()
    try:
        cond = clip.encode(text, report, texts=texts)
    except LayerError as exc:
        raise NodeError(f"CLIPSetLastLayer: {exc}", input_name="clip") from None
    except ConditioningError as exc:  # a CLIP its family cannot encode with (SD3 without any encoder)
        raise NodeError(str(exc), input_name=exc.input_name) from None
    for problem in report.problems:
        ctx.message(f"prompt: {problem}")
    return cond, report


@define_node(
    "CLIPTextEncode",
    category="conditioning",
    display_name="CLIP Text Encode (Prompt)",
    inputs=[
        Input("text", T.STRING, default="", multiline=True,
              tooltip="The prompt. (word) = weight 1.1, (word:1.3) = weight 1.3, \\( \\) = literal parentheses; "
                      "longer than 75 tokens is encoded in several 77-token windows, as ComfyUI does."),
        Input("clip", T.CLIP),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode(ctx, text: str, clip: ClipHandle):
    """Encode a prompt with ComfyUI's emphasis syntax and long-prompt windows (SDXL: both
    encoders plus the pooled output). A prompt without weights that fits one window gives
    exactly what diffusers' pipelines give.

    An empty text is encoded like any other (it is what diffusers does with
    ``negative_prompt=""``); SDXL pipelines called with no negative prompt use zeros
    instead, which a workflow gets with ConditioningZeroOut.
    """
    if not isinstance(text, str):
        raise NodeError("text must be a string", input_name="text")
    cond, report = encode_reported(ctx, _clip(clip), text)
    if report.windows > 1:
        ctx.message(f"the prompt has {report.tokens} tokens, more than the 75 of one CLIP window: encoded as "
                    f"{report.windows} windows of 77 tokens, concatenated (ComfyUI's rule)")
    return (cond,)


@define_node(
    "CLIPSetLastLayer",
    category="conditioning",
    display_name="CLIP Set Last Layer",
    inputs=[
        Input("clip", T.CLIP),
        Input("stop_at_clip_layer", T.INT, default=-1, min=DEEPEST_LAYER, max=-1, step=1,
              tooltip="The text encoder layer prompts are taken from: -1 the last, -2 the one before "
                      "('clip skip 2' in A1111 terms). SD 2.x and SDXL use -2 by default."),
    ],
    outputs=[Output("CLIP", T.CLIP)],
)
def clip_set_last_layer(ctx, clip: ClipHandle, stop_at_clip_layer: int):
    """The same CLIP, encoding prompts from an earlier layer of its text encoder(s)."""
    from nodes.families.text import LayerError, check_layer

    clip = _clip(clip)
    layer = int(stop_at_clip_layer)
    if not DEEPEST_LAYER <= layer <= -1:
        raise NodeError(f"must be between {DEEPEST_LAYER} and -1, got {layer}", input_name="stop_at_clip_layer")
    if clip._peek is not None:  # checked here, where the user chose it (encoding checks again)
        for spec in clip.family.text_encoders:
            try:
                check_layer(spec, clip.peek(spec.module).config.num_hidden_layers, layer)
            except LayerError as exc:
                raise NodeError(f"this {clip.family.name} CLIP: {exc}", input_name="stop_at_clip_layer") from None
    return (dataclasses.replace(clip, layer=layer),)


_SIZE = dict(min=0, max=16384)


@define_node(
    "CLIPTextEncodeSDXL",
    category="advanced/conditioning",
    display_name="CLIPTextEncodeSDXL",
    inputs=[
        Input("clip", T.CLIP),
        Input("width", T.INT, default=1024, **_SIZE),
        Input("height", T.INT, default=1024, **_SIZE),
        Input("crop_w", T.INT, default=0, **_SIZE),
        Input("crop_h", T.INT, default=0, **_SIZE),
        Input("target_width", T.INT, default=1024, **_SIZE),
        Input("target_height", T.INT, default=1024, **_SIZE),
        Input("text_g", T.STRING, default="", multiline=True, tooltip="The prompt for OpenCLIP bigG."),
        Input("text_l", T.STRING, default="", multiline=True, tooltip="The prompt for CLIP-L."),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode_sdxl(ctx, clip: ClipHandle, width: int, height: int, crop_w: int, crop_h: int,
                          target_width: int, target_height: int, text_g: str, text_l: str):
    """SDXL's two prompts and its size conditioning: the original size and crop the model is
    told the image had, and the target size (SDXL was trained with them; CLIPTextEncode uses
    the latent's size and no crop)."""
    clip = _clip(clip)
    names = [spec.tokenizer for spec in clip.family.text_encoders]
    if names != ["tokenizer", "tokenizer_2"]:
        raise NodeError(f"needs an SDXL CLIP (two text encoders); this one is {clip.family.name}", input_name="clip")
    for name, value in (("text_g", text_g), ("text_l", text_l)):
        if not isinstance(value, str):
            raise NodeError("must be a string", input_name=name)
    cond, _ = encode_reported(ctx, clip, text_g, texts={"tokenizer": text_l, "tokenizer_2": text_g})
    sizes = dict(width=int(width), height=int(height), crop_w=int(crop_w), crop_h=int(crop_h),
                 target_width=int(target_width), target_height=int(target_height))
    return ([[embeds, {**extra, **sizes}] for embeds, extra in cond],)


@define_node(
    "CLIPTextEncodeSDXLRefiner",
    category="advanced/conditioning",
    display_name="CLIPTextEncodeSDXLRefiner",
    inputs=[
        Input("ascore", T.FLOAT, default=6.0, min=0.0, max=1000.0, step=0.01,
              tooltip="The aesthetic score the SDXL refiner is conditioned on (6 is its usual value)."),
        Input("width", T.INT, default=1024, **_SIZE),
        Input("height", T.INT, default=1024, **_SIZE),
        Input("text", T.STRING, default="", multiline=True),
        Input("clip", T.CLIP),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode_sdxl_refiner(ctx, ascore: float, width: int, height: int, text: str, clip: ClipHandle):
    """The prompt for SDXL's refiner, with its aesthetic score and the image's original size.
    On the refiner (nodes.families.sdxl_refiner) these are its five time ids with crop 0; on
    SDXL base the width and height act as the original size (as CLIPTextEncodeSDXL's) and the
    score is carried but unused."""
    clip = _clip(clip)
    if not isinstance(text, str):
        raise NodeError("must be a string", input_name="text")
    if not any(spec.pooled for spec in clip.family.text_encoders):
        raise NodeError(f"needs an SDXL CLIP (with a pooled OpenCLIP bigG); this one is {clip.family.name}",
                        input_name="clip")
    cond, _ = encode_reported(ctx, clip, text)
    extra = dict(aesthetic_score=float(ascore), width=int(width), height=int(height))
    return ([[embeds, {**e, **extra}] for embeds, e in cond],)


@define_node(
    "T5TokenizerOptions",
    category="_for_testing/conditioning",
    inputs=[
        Input("clip", T.CLIP),
        Input("min_padding", T.INT, default=0, min=0, max=10000, step=1,
              tooltip="Pad tokens T5 sees after the prompt's end token."),
        Input("min_length", T.INT, default=0, min=0, max=10000, step=1,
              tooltip="The fewest tokens T5 sees; shorter prompts are padded up to it."),
    ],
    outputs=[Output("CLIP", T.CLIP)],
)
def t5_tokenizer_options(ctx, clip: ClipHandle, min_padding: int, min_length: int):
    """The same CLIP with T5's padding set as ComfyUI's T5 tokenizers pad: the prompt, its end
    token, ``min_padding`` pad tokens, then more up to ``min_length`` (never cut). FLUX attends
    to the padding, so it changes the image. A CLIP without T5 is returned as it is."""
    clip = _clip(clip)
    values = []
    for name, value in (("min_padding", min_padding), ("min_length", min_length)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not 0 <= value <= 10000:
            raise NodeError(f"{name} must be a whole number from 0 to 10000, got {value!r}", input_name=name)
        values.append(int(value))
    if not any(spec.kind == "t5" for spec in clip.family.text_encoders):
        ctx.message(f"this {clip.family.name} CLIP has no T5 encoder: T5TokenizerOptions changes nothing")
        return (clip,)
    return (dataclasses.replace(clip, t5_padding=(values[0], values[1])),)
