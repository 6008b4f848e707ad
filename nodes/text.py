"""CLIPTextEncode: text -> CONDITIONING through the checkpoint's text encoder(s).

The encoding itself lives in nodes.handles.ClipHandle (so it can be compared
one-to-one with diffusers' ``encode_prompt``); this node adds the user-facing
checks and messages. torch is imported only when a prompt is encoded.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle


@define_node(
    "CLIPTextEncode",
    category="conditioning",
    display_name="CLIP Text Encode (Prompt)",
    inputs=[
        Input("text", T.STRING, default="", multiline=True,
              tooltip="The prompt. Longer than 75 tokens is cut to CLIP's 77-token window, as diffusers does."),
        Input("clip", T.CLIP),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode(ctx, text: str, clip: ClipHandle):
    """Encode a prompt exactly as diffusers' pipelines do (SDXL: both encoders plus the pooled output).

    An empty text is encoded like any other (it is what diffusers does with
    ``negative_prompt=""``); SDXL pipelines called with no negative prompt use zeros
    instead, which a workflow gets with ConditioningZeroOut-style nodes, not here.
    """
    if not isinstance(text, str):
        raise NodeError("text must be a string", input_name="text")
    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a checkpoint loader, got {type(clip).__name__}", input_name="clip")
    names = [spec.tokenizer for spec in clip.family.text_encoders]
    if any(clip.tokenize(text, n)[1] for n in names if n in clip.tokenizers):
        ctx.message("the prompt is longer than CLIP's 77-token window; the rest was cut off")
    return (clip.encode(text),)
