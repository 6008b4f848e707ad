"""HiDream-I1's nodes with ComfyUI's names and inputs: QuadrupleCLIPLoader, CLIPTextEncodeHiDream.

The family (text encoding, network, flow sampling) is nodes.families.hidream; the loader only names the
four encoder files (CLIP-L, CLIP-G, T5-XXL, Llama 3.1 8B Instruct, in any order: they are told apart
by their shapes, as TripleCLIPLoader's are), the encoder node gives each encoder its own prompt.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle
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


PROMPTS = (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2"), ("t5xxl", "tokenizer_3"), ("llama", "tokenizer_4"))


@define_node(
    "CLIPTextEncodeHiDream",
    category="advanced/conditioning",
    inputs=[Input("clip", T.CLIP)] + [Input(name, T.STRING, default="", multiline=True,
                                            tooltip=f"The prompt {label} sees.")
                                      for (name, _), label in zip(PROMPTS, ("CLIP-L", "CLIP-G", "T5-XXL", "Llama"))],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def clip_text_encode_hidream(ctx, clip, clip_l: str, clip_g: str, t5xxl: str, llama: str):
    """Encode one prompt per HiDream encoder (HiDreamImagePipeline's prompt, prompt_2, prompt_3, prompt_4)."""
    from nodes.families.hidream import HiDream
    from nodes.text import encode_reported

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if not isinstance(clip.family, HiDream):
        raise NodeError(f"clip is a {clip.family.name} text encoder; CLIPTextEncodeHiDream needs HiDream's "
                        "(QuadrupleCLIPLoader)", "clip")
    values = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl, "llama": llama}
    for name, value in values.items():
        if not isinstance(value, str):
            raise NodeError(f"{name} must be a string", name)
    cond, _ = encode_reported(ctx, clip, llama, texts={tokenizer: values[name] for name, tokenizer in PROMPTS})
    return (cond,)
