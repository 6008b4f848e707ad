"""Pictures into a Qwen3-VL text encoder (Krea 2's qwen3vl_4b; the same model class serves Qwen-Image 2.1's
and FIBO 2's Qwen3-VL): what every family that hands the encoder pictures shares.

A picture goes into the prompt as ``<|vision_start|><|image_pad|><|vision_end|>`` (ComfyUI's block), the
one ``<|image_pad|>`` repeated once per merged 2x2 patch; transformers' ``Qwen3VLModel`` (built from the
file, its tower on the first picture read: nodes.checkpoint.qwen3_vision) puts the tower's features in
their place, adds the DeepStack features to the first text layers' states there and gives the prompt
Qwen3-VL's 3-axis rope positions (``get_rope_index``, from which tokens are pictures). The pixels are
transformers' Qwen2-VL image processor's at Qwen3-VL's settings: 16-pixel patches, 2 frames, 2x2 merge, mean and std 0.5
(ComfyUI's normalisation for Qwen3-VL), each side a multiple of 32 within ComfyUI's pixel bounds
(:data:`MIN_PIXELS`.. :data:`MAX_PIXELS`, the bounds its Qwen3-VL reads pictures with; the release's
processor config sets 65536.. instead, which changes only pictures under 256x256). The processor
resizes with PIL's bicubic filter, ComfyUI with bilinear interpolation, so a picture whose sides are
not already multiples of 32 is read from slightly different pixels than ComfyUI reads.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import qwen_vision
from nodes.families.base import ConditioningError

BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
PAD = "<|image_pad|>"
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
MEAN = STD = (0.5, 0.5, 0.5)


#: The tower's submodule: loaded on the first picture read (nodes.runtime.deferred), so a use that hands
#: the encoder pictures names it (``clip.encoder("text_encoder", parts=(TOWER,))``).
TOWER = qwen_vision.TOWER


def tower(model: Any) -> Any:
    """The vision tower of a loaded Qwen3-VL encoder (built: the use named :data:`TOWER`), or None."""
    return getattr(model, TOWER, None)


def has_tower(model: Any) -> bool:
    """Whether a loaded Qwen3-VL encoder reads pictures: its tower built or waiting to be (not a text-only file)."""
    from nodes.runtime.deferred import has_part

    return has_part(model, TOWER)


def vision_inputs(model: Any, pictures: list, bounds: tuple[int, int] = (MIN_PIXELS, MAX_PIXELS)) -> dict[str, Any]:
    """``pixel_values`` and ``image_grid_thw`` of PIL ``pictures`` for ``model``'s tower (module docstring);
    ``bounds``: the least and most pixels a picture is resized to stay within (a pipeline's processor
    config may set others: Qwen3-VL's release sets 65536 and 16777216)."""
    from transformers import Qwen2VLImageProcessorPil

    config = model.config.vision_config
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": bounds[0], "longest_edge": bounds[1]}, patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size, merge_size=config.spatial_merge_size,
        image_mean=list(MEAN), image_std=list(STD))
    got = processor(images=pictures, return_tensors="pt")
    return {"pixel_values": got["pixel_values"], "image_grid_thw": got["image_grid_thw"]}


def prompt_inputs(model: Any, tokenizer: Any, text: str, pictures: list, what: str = "prompt",
                  bounds: tuple[int, int] = (MIN_PIXELS, MAX_PIXELS)) -> dict[str, Any]:
    """The keyword arguments of ``model(...)`` for ``text`` (its picture blocks in place, one per picture)
    with PIL ``pictures``: ``input_ids`` [1, n], ``pixel_values``, ``image_grid_thw`` and
    ``mm_token_type_ids`` (1 at picture tokens), on the model's device. ``what`` names the input a
    slot-count mismatch is blamed on (ConditioningError); ``bounds`` as :func:`vision_inputs`'s."""
    import torch

    from nodes.families.qwen_image_edit import expand_pads

    if not has_tower(model):
        raise ConditioningError("this Qwen3-VL text encoder has no vision tower (its file holds no visual.* "
                                "weights): load the full Qwen3-VL file to read pictures", "clip")
    if tower(model) is None:
        raise RuntimeError(f"the vision tower is not loaded: use the encoder with parts=({TOWER!r},)")
    device = model.get_input_embeddings().weight.device
    vision = vision_inputs(model, pictures, bounds)
    grid = vision["image_grid_thw"]
    if text.count(PAD) != len(grid):
        raise ConditioningError(f"the prompt has {text.count(PAD)} picture slots for {len(grid)} pictures", what)
    text = expand_pads(text, grid, model.config.vision_config.spatial_merge_size)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=device)
    kinds = (ids == tokenizer.convert_tokens_to_ids(PAD)).int()
    return {"input_ids": ids, "pixel_values": vision["pixel_values"].to(device), "image_grid_thw": grid.to(device),
            "mm_token_type_ids": kinds}
