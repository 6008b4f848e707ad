"""Qwen-Image 2.1's own nodes with ComfyUI's names and inputs: TextEncodeQwenImage21 (the prompt, the
negative and an empty latent in one node) and QwenImage21Cache (the text-prefix KV cache setting).

TextEncodeQwenImage21 encodes both prompts as CLIPTextEncode does for a Qwen-Image 2.1 CLIP
(nodes.families.qwen_image21) and gives an empty 64-channel latent of ``resolution`` x ``resolution``
pixels (1024 when 0), ComfyUI's output for a prompt without pictures. Its reference pictures
(``images.image_1`` ..) need Qwen3-VL's vision tower, which Kiln does not load yet: a picture is
refused by its input's name.

QwenImage21Cache sets where ComfyUI keeps the text's keys and values between steps. The text tokens
are modulated at t = 0 and attend causally, so their keys and values are the same at every step:
ComfyUI's ``default`` storage is lossless and ``off`` recomputes them. Kiln recomputes them every
step (``off``), which gives the same picture; ``int8`` / ``int4`` (approximate storage) are accepted
and not applied, with a message.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Grow, Input, Output, define_node
from nodes.handles import ClipHandle

#: ComfyUI's reference pictures: image_1 .. image_16, none required.
IMAGES = Grow("images", min=0, prefix="image_", count=16, template="image")
CHANNELS, DOWNSCALE = 64, 16


@define_node(
    "TextEncodeQwenImage21",
    category="advanced/conditioning",
    inputs=[Input("clip", T.CLIP),
            Input("prompt", T.STRING, default="", multiline=True),
            Input("negative_prompt", T.STRING, default="", multiline=True),
            Input("vae", T.VAE, optional=True, tooltip="Encodes reference pictures (not supported yet)"),
            Input("resolution", T.INT, default=1024, min=0, max=4096, step=32,
                  tooltip="The empty latent's side in pixels (0: 1024)"),
            *IMAGES.inputs(T.IMAGE, tooltip="Reference pictures (need Qwen3-VL's vision tower: not supported yet)")],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING), Output("latent", T.LATENT)],
)
def text_encode_qwen_image21(ctx, clip: Any, prompt: str, negative_prompt: str, vae: Any = None,
                             resolution: int = 1024, **images: Any):
    """Both prompts encoded with Qwen3-VL 8B (QwenImage21Pipeline's text-to-image encoding) and an empty
    latent of the asked size."""
    import torch

    from nodes.families.base import ConditioningError
    from nodes.families.qwen_image21 import NO_PICTURES

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if clip.family.name != "qwen_image21":
        raise NodeError(f"this CLIP is {clip.family.name}'s; TextEncodeQwenImage21 needs Qwen3-VL 8B "
                        "(CLIPLoader type qwen_image on qwen3vl_8b*.safetensors)", "clip")
    given = [name for name, image in images.items() if image is not None]
    if given:
        raise NodeError(NO_PICTURES, given[0])
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(value, str):
            raise NodeError("must be a string", name)
    side = int(resolution) or 1024
    if side < 0 or side % 32:
        raise NodeError(f"must be a multiple of 32 pixels, got {resolution}", "resolution")
    try:
        positive, negative = clip.encode(prompt), clip.encode(negative_prompt)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    latent = {"samples": torch.zeros([1, CHANNELS, side // DOWNSCALE, side // DOWNSCALE])}
    return positive, negative, latent


@define_node(
    "QwenImage21Cache",
    category="advanced/model",
    inputs=[Input("model", T.MODEL),
            Input("device", T.COMBO, choices=("auto", "gpu", "cpu", "off"), default="auto",
                  tooltip="Where ComfyUI keeps the text's keys and values; Kiln recomputes them (off), "
                          "which gives the same picture"),
            Input("dtype", T.COMBO, choices=("default", "int8", "int4"), default="default",
                  tooltip="ComfyUI's storage precision of that cache; not applied by Kiln")],
    outputs=[Output("MODEL", T.MODEL)],
)
def qwen_image21_cache(ctx, model: Any, device: str = "auto", dtype: str = "default"):
    """The model as it is: Kiln recomputes the text prefix every step (see the module docstring)."""
    if dtype != "default":
        ctx.message(f"QwenImage21Cache: dtype {dtype} (ComfyUI's approximate cache storage) is not applied; "
                    "Kiln recomputes the text every step, the lossless result")
    return (model,)
