"""Text-encoder names in saved files (nodes/families/encoder_names.py) and LoraLoader reading them back.

ComfyUI saves a text encoder's LoRA part as ``text_encoders.<name>.transformer.<module>``; the name says
which encoder, not its position, so SD3's T5 (its third encoder) and Chroma's (its only one) must both be
found by the name ``t5xxl``: the CLIP family's own prefixes are tried before any fixed table.
"""
from __future__ import annotations

import torch

import tiny_sd3
from nodes import lora_keys
from nodes.families import by_name
from nodes.families.encoder_names import clip_file_name


def _t5_lora(module: str = "encoder.block.0.layer.0.SelfAttention.q") -> dict[str, torch.Tensor]:
    rows, cols = dict(tiny_sd3.components("large")["text_encoder_3"].named_modules())[module].weight.shape
    return {f"text_encoders.t5xxl.transformer.{module}.lora_A.weight": torch.ones(2, cols),
            f"text_encoders.t5xxl.transformer.{module}.lora_B.weight": torch.ones(rows, 2)}


def test_saved_names_are_comfyuis():
    names = {family: [clip_file_name(by_name(family), s) for s in by_name(family).text_encoders]
             for family in ("sd1", "sd2", "sdxl", "sd3", "flux", "chroma", "qwen_image", "z-image", "lumina2",
                            "hidream")}
    assert names == {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"],
                     "sd3": ["clip_l", "clip_g", "t5xxl"], "flux": ["clip_l", "t5xxl"], "chroma": ["t5xxl"],
                     "qwen_image": ["qwen25_7b"], "z-image": ["qwen3_4b"], "lumina2": ["gemma2_2b"],
                     "hidream": ["clip_l", "clip_g", "t5xxl", "llama"]}


def test_a_t5_part_lands_on_the_familys_own_t5():
    t5 = tiny_sd3.components("large")["text_encoder_3"]
    lookups = {"text_encoder_3": lora_keys.module_names(t5, "text_encoder_3")}
    shapes = {"text_encoder_3": {k: tuple(p.shape) for k, p in t5.named_parameters()}}
    found = lora_keys.match(_t5_lora(), lookups, shapes, lora_keys.encoder_prefixes(by_name("sd3")))
    assert list(found.tables) == ["text_encoder_3"] and found.count == 1 and not found.unmatched
    # the fixed table alone sends t5xxl to a second encoder, which SD3's CLIP-G is and Chroma's CLIP lacks
    assert lora_keys.match(_t5_lora(), lookups, shapes).count == 0
    chroma = lora_keys.encoder_prefixes(by_name("chroma"))
    found = lora_keys.match(_t5_lora(), {"text_encoder": lookups["text_encoder_3"]},
                            {"text_encoder": shapes["text_encoder_3"]}, chroma)
    assert list(found.tables) == ["text_encoder"] and found.count == 1
