"""The names saved files give a family's text encoders (one rule for writing and reading them).

CLIPSave writes ``<prefix>_<name>.safetensors`` and LoraSave ``text_encoders.<name>.transformer.`` keys;
LoraLoader maps those keys back to the encoder (nodes.lora_keys.encoder_prefixes). Where ComfyUI has a
name for the encoder (its text encoder modules' ``name``), Kiln uses it, so files travel both ways.
"""
from __future__ import annotations

from typing import Any

#: ComfyUI's names for the text encoders it knows by kind (its text encoder modules' ``name``); the other
#: kinds go by their own name made key-safe
_COMFY_TEXT_NAMES = {"openai": "clip_l", "t5": "t5xxl", "umt5": "umt5xxl", "qwen2.5-vl": "qwen25_7b",
                     "qwen3": "qwen3_4b", "gemma2": "gemma2_2b", "mistral3": "mistral3_24b", "llama3": "llama",
                     "byt5": "byt5_small", "pile_t5": "pile_t5xl"}


def clip_file_name(family: Any, spec: Any) -> str:
    """A text encoder's name in saved files (CLIPSave's file suffix, LoraSave's
    ``text_encoders.<name>.transformer.`` keys), ComfyUI's where it has one: clip_l, clip_g (SDXL's and
    SD3's OpenCLIP bigG), clip_h (SD 2's OpenCLIP ViT-H), t5xxl, qwen25_7b, ... LoraLoader reads the same
    names back onto the same encoder (nodes.lora), so what Kiln saves it loads."""
    if spec.kind == "openclip":
        return "clip_g" if family.name.startswith(("sdxl", "sd3", "hidream")) else "clip_h"
    return _COMFY_TEXT_NAMES.get(spec.kind) or "".join(c if c.isalnum() else "_" for c in spec.kind)
