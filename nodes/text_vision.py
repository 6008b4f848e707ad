"""Pictures in TextGenerate's prompt, for a Qwen2.5-VL (Qwen-Image's file) or a Qwen3-VL (Krea 2's)
loaded with its vision tower.

Each picture takes ComfyUI's place in the user turn, ``<|vision_start|><|image_pad|><|vision_end|>``
before the text (a raw prompt gets the blocks it lacks at the start of its user turn, as ComfyUI's
tokenizer adds them), and reaches the model the way Qwen-Image-Edit's encoding reads pictures
(nodes.families.qwen_image_edit): transformers' Qwen2-VL image processor at the release's pixel
bounds, one ``<|image_pad|>`` per merged patch, the vision tower's features in their place.
Positions are Qwen2.5-VL's 3-D (time, row, column) rope indices, computed once for the prompt by
the model's ``get_rope_index``; each new token then continues from the prompt's last position
(the index shift the pictures cause, ``rope_deltas``, carried on), as transformers' ``generate``
continues them. ComfyUI sizes pictures with its own resize, so its pictures may be read at
another resolution than Kiln's. A Qwen3-VL reads its pixels at Qwen3-VL's settings
(nodes.families.qwen3_vl) and takes the same positions from its own ``get_rope_index``; its
DeepStack features join the first pass with the pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
PAD = "<|image_pad|>"
USER = "<|im_start|>user\n"


def with_blocks(text: str, count: int) -> str:
    """A raw prompt with a picture block for each of ``count`` pictures it has no ``<|image_pad|>`` for:
    after its last block, else at the start of its user turn, else in front (ComfyUI's rule). More
    slots than pictures is an error (ValueError)."""
    have = text.count(PAD)
    if have > count:
        raise ValueError(f"the prompt has {have} picture slots (<|image_pad|>) for {count} pictures")
    missing = BLOCK * (count - have)
    if not missing:
        return text
    if BLOCK in text:
        at = text.rindex(BLOCK) + len(BLOCK)
    elif USER in text:
        at = text.index(USER) + len(USER)
    else:
        at = 0
    return text[:at] + missing + text[at:]


@dataclass
class PicturePrompt:
    """What the decoding loop needs for a prompt with pictures (nodes.text_sampling.generate)."""

    ids: list[int]
    #: extra arguments of the first pass (pixels, their grid, the prompt's 3-D positions)
    prefill: dict[str, Any] = field(default_factory=dict)
    #: ``position(index) -> position_ids`` of the token at absolute ``index`` after the prompt
    position: Callable[[int], Any] | None = None


def qwen25_pictures(model: Any, tokenizer: Any, text: str, pictures: list) -> PicturePrompt:
    """The prompt ``text`` (its picture blocks in place) with IMAGE ``pictures`` [1, H, W, C] for
    ``model``, a transformers ``Qwen2_5_VLModel`` on its device."""
    from nodes.families.qwen_image_edit import to_pil, vision_inputs

    return picture_prompt(model, tokenizer, text, vision_inputs([to_pil(p[0]) for p in pictures]))


def qwen3_pictures(model: Any, tokenizer: Any, text: str, pictures: list) -> PicturePrompt:
    """As :func:`qwen25_pictures` for a transformers ``Qwen3VLModel`` (Krea 2's Qwen3-VL with its tower):
    Qwen3-VL's pixels (nodes.families.qwen3_vl.vision_inputs); its DeepStack features join in the first pass."""
    from nodes.families.qwen3_vl import vision_inputs
    from nodes.families.qwen_image_edit import to_pil

    return picture_prompt(model, tokenizer, text, vision_inputs(model, [to_pil(p[0]) for p in pictures]))


def picture_prompt(model: Any, tokenizer: Any, text: str, vision: dict[str, Any]) -> PicturePrompt:
    """The :class:`PicturePrompt` of ``text`` for a Qwen-VL ``model`` given its pictures' ``pixel_values``
    and ``image_grid_thw`` (``vision``): the pads expanded, the 3-D positions from ``get_rope_index``."""
    import torch

    from nodes.families.qwen_image_edit import expand_pads

    text = expand_pads(text, vision["image_grid_thw"], model.config.vision_config.spatial_merge_size)
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    device = model.get_input_embeddings().weight.device
    tokens = torch.tensor([ids], device=device)
    grid = vision["image_grid_thw"].to(device)
    kinds = (tokens == tokenizer.convert_tokens_to_ids(PAD)).int()  # 1: a picture's token
    positions, shift = model.get_rope_index(tokens, kinds, image_grid_thw=grid)

    def position(index: int) -> Any:
        return (torch.full((3, 1, 1), index, device=device) + shift.to(device).reshape(1, -1, 1)).long()

    return PicturePrompt(ids, {"pixel_values": vision["pixel_values"].to(device), "image_grid_thw": grid,
                               "position_ids": positions}, position)
