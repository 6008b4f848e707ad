"""HiDream-I1's loader with ComfyUI's name and inputs: QuadrupleCLIPLoader.

The family (text encoding, network, flow sampling) is nodes.families.hidream; the node only names the
four encoder files (CLIP-L, CLIP-G, T5-XXL, Llama 3.1 8B Instruct, in any order: they are told apart
by their shapes, as TripleCLIPLoader's are).
"""
from __future__ import annotations

from engine import types as T
from engine.node import Input, Output, define_node
from nodes.split_loaders import _clip, _texts, texts_fingerprint, texts_validator

CLIP_INPUTS = ("clip_name1", "clip_name2", "clip_name3", "clip_name4")
#: The family QuadrupleCLIPLoader loads (ComfyUI's: HiDream's four encoders).
QUADRUPLE_TYPE = "hidream"


@define_node(
    "QuadrupleCLIPLoader",
    category="advanced/loaders",
    display_name="QuadrupleCLIPLoader",
    inputs=[Input(name, T.COMBO, choices=_texts,
                  tooltip="HiDream's text encoders: clip_l, clip_g, t5xxl and llama_3.1_8b_instruct files, in any "
                          "order.")
            for name in CLIP_INPUTS],
    outputs=[Output("CLIP", T.CLIP)],
    validate=texts_validator(CLIP_INPUTS),
    fingerprint=texts_fingerprint(CLIP_INPUTS),
)
def quadruple_clip_loader(ctx, clip_name1: str, clip_name2: str, clip_name3: str, clip_name4: str):
    """Load HiDream's four text encoders from four files (told apart by their shapes)."""
    names = (clip_name1, clip_name2, clip_name3, clip_name4)
    return (_clip(ctx, list(zip(CLIP_INPUTS, names)), QUADRUPLE_TYPE),)
