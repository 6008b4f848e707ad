"""Qwen-Image-Edit (and Edit 2509/2511, "Plus"): Qwen-Image reading pictures twice.

* **Through the text encoder.** Each picture is cut into 14-pixel patches for Qwen2.5-VL's vision
  tower, whose merged embeddings take the place of the ``<|image_pad|>`` tokens in the prompt, with
  Qwen2.5-VL's 3-D (time, row, column) rope positions: transformers' ``Qwen2_5_VLModel`` does both
  (nodes.checkpoint.qwen_vision builds it from the file; the tower on the first picture read). The
  prompt sits in the Edit template and the first :data:`EDIT_TOKENS` tokens of the last hidden state
  are dropped, as the pipelines and ComfyUI do. Edit puts one picture before the prompt; Plus names
  each ``Picture k:``.
* **As reference latents.** The pictures' VAE latents ride on the conditioning under FLUX Kontext's
  key (nodes.families.flux_references); the transformer appends their packed tokens to the image's,
  each with its own ``img_shapes`` entry (so reference k sits at rope frame k: ComfyUI's ``index``
  method) and keeps only the image's outputs. ``index_timestep_zero`` (ComfyUI's 2511 templates)
  modulates the references at time 0 (diffusers' ``zero_cond_t``).
* **Sizes.** As diffusers' pipelines (:func:`calculate_dimensions`, multiples of 32, Lanczos): Edit
  resizes the picture to about 1024x1024 for both the vision tower and the VAE; Plus to about 384x384
  for the vision tower and 1024x1024 for the VAE. ComfyUI rounds differently (nearest pixel or 8,
  area filter); Kiln follows diffusers.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from nodes.families import flux, flux_references
from nodes.families.base import ConditioningError
from nodes.families.input_checks import pad_to_patches

#: The pipelines' (and ComfyUI's) Edit template; the Edit model's picture goes before the prompt.
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                 "objects, background), then explain how the user's text instruction should alter or modify the "
                 "image. Generate a new image that meets the user's requirements while maintaining consistency with "
                 "the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")
#: Leading tokens dropped after encoding (through ``<|im_start|>user\n``).
EDIT_TOKENS = 64
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
PAD = "<|image_pad|>"
#: Plus names its pictures.
PLUS_PICTURE = "Picture {}: " + PICTURE
#: Target areas (pixels): Edit's picture and every VAE picture; Plus's vision-tower pictures.
AREA = 1024 * 1024
PLUS_VISION_AREA = 384 * 384
#: Qwen2.5-VL's released image processor bounds (pixels after its own resize to multiples of 28).
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
#: ComfyUI's reference method that modulates references at time 0.
TIME_ZERO = "index_timestep_zero"
METHODS = (None, "index", TIME_ZERO)


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at ``ratio`` = width / height, each a multiple of 32
    (diffusers' rule for both pipelines)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def to_pil(image: "Any") -> "Any":
    """One IMAGE [H, W, C] (0..1) as an 8-bit RGB picture (the pipelines take PIL pictures)."""
    import numpy as np
    from PIL import Image

    array = (image[..., :3].float().clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
    return Image.fromarray(array, "RGB")


def resized(picture: "Any", area: int) -> "Any":
    """``picture`` resized to :func:`calculate_dimensions` of ``area`` with Lanczos (VaeImageProcessor.resize)."""
    from PIL import Image

    width, height = calculate_dimensions(area, picture.width / picture.height)
    return picture.resize((width, height), resample=Image.LANCZOS)


def as_image(picture: "Any") -> "Any":
    """A PIL picture as an IMAGE [1, H, W, 3] in 0..1."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]


def vision_inputs(pictures: list) -> dict[str, "Any"]:
    """``pixel_values`` and ``image_grid_thw`` of ``pictures`` (transformers' Qwen2-VL image processor
    with the release's pixel bounds: its own resize to multiples of 28, CLIP's mean and std)."""
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    got = processor(images=pictures, return_tensors="pt")
    return {"pixel_values": got["pixel_values"], "image_grid_thw": got["image_grid_thw"]}


def expand_pads(text: str, grids: "Any", merge: int) -> str:
    """Each ``<|image_pad|>`` repeated once per merged patch of its picture (what Qwen2VLProcessor does)."""
    parts = text.split(PAD)
    if len(parts) - 1 != len(grids):
        raise ConditioningError(f"the prompt has {len(parts) - 1} picture slots for {len(grids)} pictures", "prompt")
    out = parts[0]
    for grid, part in zip(grids, parts[1:]):
        out += PAD * (int(grid.prod()) // merge ** 2) + part
    return out


def encode(clip: Any, prompt: str, pictures: list, plus: bool) -> list:
    """CONDITIONING of ``prompt`` with PIL ``pictures`` read by the vision tower (module docstring).
    Plus without pictures keeps the Edit template (as its pipeline and ComfyUI's node do)."""
    import torch

    from nodes.checkpoint.qwen_vision import TOWER
    from nodes.families import qwen_image

    if plus:
        text = "".join(PLUS_PICTURE.format(k + 1) for k in range(len(pictures))) + prompt
    else:
        text = PICTURE + prompt
    tok = clip.tokenizers["tokenizer"]
    # the tower is built on the first picture read (nodes.checkpoint.qwen_vision): only a use with pictures names it
    with torch.inference_mode(), clip.encoder("text_encoder", (TOWER,) if pictures else ()) as vl:
        if pictures and getattr(vl, "visual", None) is None:
            raise ConditioningError("this Qwen2.5-VL text encoder has no vision tower (its file has no visual.* "
                                    "weights); the Edit models read pictures with it: load the full "
                                    "qwen_2.5_vl_7b*.safetensors", "clip")
        device = next(vl.parameters()).device
        vision = {}
        if pictures:
            vision = vision_inputs(pictures)
            text = expand_pads(text, vision["image_grid_thw"], vl.config.vision_config.spatial_merge_size)
            vision = {k: v.to(device) for k, v in vision.items()}
        got = tok([EDIT_TEMPLATE.format(text)], return_tensors="pt")
        states = vl(input_ids=got.input_ids.to(device), attention_mask=got.attention_mask.to(device),
                    **vision).last_hidden_state
    states = states[:, EDIT_TOKENS:]
    mask = torch.ones(1, states.shape[1], dtype=torch.float32)
    return [[states.to("cpu", torch.float32), {qwen_image.MASK: mask}]]


def reference_tokens(refs: flux_references.References) -> tuple["Any", list[tuple[int, int, int]]]:
    """The references' packed tokens [rows, n, 4C] and their ``img_shapes`` entries (one frame each).
    A side of odd length is padded by wrapping around (ComfyUI's rule) so it cuts into patches."""
    import torch

    chunks, shapes = [], []
    for ref in refs.latents:
        ref = pad_to_patches(ref, 2)
        chunks.append(flux.pack(ref))
        shapes.append((1, ref.shape[-2] // 2, ref.shape[-1] // 2))
    return torch.cat(chunks, dim=1), shapes


def control_over_image_tokens(kwargs: dict[str, Any], extra: int) -> dict[str, Any]:
    """A ControlNet's per-block samples (image tokens only) padded with zeros over ``extra`` appended
    reference tokens, so they add to the image's tokens alone (ComfyUI's rule)."""
    import torch

    samples = kwargs.get("controlnet_block_samples")
    if not samples:
        return kwargs
    pad = [torch.nn.functional.pad(s, (0, 0, 0, extra)) for s in samples]
    return {**kwargs, "controlnet_block_samples": pad}


@contextlib.contextmanager
def references_at_time_zero(transformer: Any, on: bool) -> Iterator[None]:
    """diffusers' ``zero_cond_t`` switched on for one call (a transformer configured with it keeps it)."""
    modules = [transformer, *transformer.transformer_blocks]
    before = [getattr(m, "zero_cond_t", False) for m in modules]
    if on:
        for m in modules:
            m.zero_cond_t = True
    try:
        yield
    finally:
        for m, b in zip(modules, before):
            m.zero_cond_t = b


def network_kwargs(extras: list[dict], batch: int, latent: Any, device: Any, dtype: Any) -> dict[str, Any]:
    """``reference_latents`` of a call (none without references). Qwen-Image places reference k at
    rope frame k: ComfyUI's ``index`` (its Qwen-Image default) or ``index_timestep_zero``."""
    method = extras[0].get(flux_references.METHOD)
    if not extras[0].get(flux_references.LATENTS):
        return {}
    if method not in METHODS:
        raise ConditioningError(f"reference_latents_method {method!r}: Qwen-Image places reference k at frame k "
                                "(index, or index_timestep_zero for Qwen-Image-Edit-2511); remove "
                                "FluxKontextMultiReferenceLatentMethod or set it to one of those",
                                extras[0].get("_input", "positive"))
    plain = [{k: v for k, v in e.items() if k != flux_references.METHOD} for e in extras]
    refs = flux_references.for_call(plain, batch, latent, device, dtype)
    return {"reference_latents": flux_references.References(refs.latents, method or "index")}
