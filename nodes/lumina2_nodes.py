"""Lumina 2's node with ComfyUI's name and inputs: CLIPTextEncodeLumina2.

Lumina Image 2.0 was trained on prompts that open with a system prompt and `` <Prompt Start> ``; ComfyUI's
node picks one of the two released system prompts and writes the user's words after it, then encodes the
whole as CLIPTextEncode does (the family's encoding: nodes.families.lumina2). RenormCFG, ComfyUI's other
Lumina 2 node, is in nodes.guidance_patches.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.families.lumina2 import PROMPT_START, SYSTEM_PROMPTS
from nodes.handles import ClipHandle


@define_node(
    "CLIPTextEncodeLumina2",
    category="conditioning",
    display_name="CLIP Text Encode for Lumina2",
    inputs=[
        Input("system_prompt", T.COMBO, choices=list(SYSTEM_PROMPTS),
              tooltip="Lumina 2's two system prompts. superior: " + SYSTEM_PROMPTS["superior"] + " alignment: "
                      + SYSTEM_PROMPTS["alignment"]),
        Input("user_prompt", T.STRING, default="", multiline=True, tooltip="The text to be encoded."),
        Input("clip", T.CLIP, tooltip="The CLIP model used for encoding the text."),
    ],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode_lumina2(ctx, system_prompt: str, user_prompt: str, clip):
    """Encode ``<system prompt> <Prompt Start> <user prompt>`` (ComfyUI's wording) with ``clip``."""
    from nodes.text import encode_reported

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if system_prompt not in SYSTEM_PROMPTS:
        raise NodeError(f"system_prompt must be one of {', '.join(SYSTEM_PROMPTS)}, got {system_prompt!r}",
                        "system_prompt")
    if not isinstance(user_prompt, str):
        raise NodeError(f"user_prompt must be a string, got {type(user_prompt).__name__}", "user_prompt")
    cond, _ = encode_reported(ctx, clip, SYSTEM_PROMPTS[system_prompt] + PROMPT_START + user_prompt)
    return (cond,)
