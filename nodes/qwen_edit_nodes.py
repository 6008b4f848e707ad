"""Qwen-Image-Edit's text encoders with ComfyUI's names and inputs: TextEncodeQwenImageEdit (one
picture: Qwen-Image-Edit) and TextEncodeQwenImageEditPlus (up to three: Edit 2509/2511).

Each encodes the prompt with its pictures read by Qwen2.5-VL's vision tower and, given a VAE, puts
the pictures' latents on the CONDITIONING as reference latents (ReferenceLatent's key), which the
Qwen-Image transformer appends to its image tokens. The rules (template, sizes, token placement)
are nodes.families.qwen_image_edit's; sizes follow diffusers' pipelines, not ComfyUI's rounding.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle, VaeHandle

COND = [Output("CONDITIONING", T.CONDITIONING)]


def _picture(ctx: Any, image: Any, name: str) -> Any:
    """The first picture of an IMAGE input as PIL (the pipelines read one picture per input)."""
    if getattr(image, "ndim", None) != 4 or image.shape[-1] < 3:
        raise NodeError("is not an IMAGE ([batch, height, width, 3])", name)
    if image.shape[0] > 1:
        ctx.message(f"{name}: a batch of {image.shape[0]} images; the first one is used")
    from nodes.families.qwen_image_edit import to_pil

    return to_pil(image[0])


def _encode(ctx: Any, clip: Any, prompt: str, vae: Any, images: list[tuple[str, Any]], plus: bool) -> tuple:
    from nodes.families import flux_references, qwen_image_edit
    from nodes.families.base import ConditioningError

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if clip.family.name == "krea2":  # ComfyUI's Krea 2 style-reference template feeds pictures here
        return _krea2(ctx, clip, prompt, images, plus)
    if clip.family.name == "longcat_image":  # ComfyUI's LongCat-Image-Edit template feeds its picture here
        return _longcat(ctx, clip, prompt, vae, images)
    if clip.family.name != "qwen_image":
        raise NodeError(f"this CLIP is {clip.family.name}'s; the Qwen-Image Edit encoders need Qwen2.5-VL "
                        "(CLIPLoader type qwen_image on qwen_2.5_vl_7b*.safetensors)", "clip")
    if not isinstance(prompt, str):
        raise NodeError("must be a string", "prompt")
    if vae is not None and not isinstance(vae, VaeHandle):
        raise NodeError(f"vae must come from a VAE loader, got {type(vae).__name__}", "vae")
    pictures = [(name, _picture(ctx, image, name)) for name, image in images if image is not None]
    try:
        if not pictures and not plus:  # Edit without a picture: the text-to-image template, as ComfyUI's
            cond = clip.encode(prompt)
        else:
            vision = [qwen_image_edit.resized(p, qwen_image_edit.PLUS_VISION_AREA if plus else qwen_image_edit.AREA)
                      for _, p in pictures]
            cond = qwen_image_edit.encode(clip, prompt, vision, plus)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    if vae is not None and pictures:
        refs = [vae.encode(qwen_image_edit.as_image(qwen_image_edit.resized(p, qwen_image_edit.AREA)))
                for _, p in pictures]
        for _, extra in cond:
            extra[flux_references.LATENTS] = [*extra.get(flux_references.LATENTS, ()), *refs]
    return (cond,)


def _krea2(ctx: Any, clip: Any, prompt: str, images: list[tuple[str, Any]], plus: bool) -> tuple:
    """A Krea 2 CLIP (ComfyUI's style-reference template): the pictures read by Qwen3-VL's vision tower
    (nodes.families.krea2.encode_pictures), sized as the Qwen-Image pictures are (Plus: about 384x384;
    Edit: about 1024x1024). Edit without a picture is CLIPTextEncode's encoding. No reference latents:
    Krea 2's transformer reads none (ComfyUI's ignores them), so the VAE is not run."""
    from nodes.families import krea2, qwen_image_edit
    from nodes.families.base import ConditioningError

    if not isinstance(prompt, str):
        raise NodeError("must be a string", "prompt")
    pictures = [_picture(ctx, image, name) for name, image in images if image is not None]
    if not pictures and not plus:
        return (clip.encode(prompt),)
    area = qwen_image_edit.PLUS_VISION_AREA if plus else qwen_image_edit.AREA
    try:
        return (krea2.encode_pictures(clip, prompt, [qwen_image_edit.resized(p, area) for p in pictures], plus),)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None


def _longcat(ctx: Any, clip: Any, prompt: str, vae: Any, images: list[tuple[str, Any]]) -> tuple:
    """A LongCat-Image CLIP (ComfyUI's LongCat-Image-Edit template): the one picture sized as
    LongCatImageEditPipeline sizes it, read by Qwen2.5-VL's vision tower in the editing template
    (nodes.families.longcat.encode_picture) and, with a VAE, its latent as the reference. Without a picture
    it is CLIPTextEncode's encoding (the text-to-image template)."""
    from nodes.families import flux_references, longcat, qwen_image_edit
    from nodes.families.base import ConditioningError

    if not isinstance(prompt, str):
        raise NodeError("must be a string", "prompt")
    if vae is not None and not isinstance(vae, VaeHandle):
        raise NodeError(f"vae must come from a VAE loader, got {type(vae).__name__}", "vae")
    given = [(name, image) for name, image in images if image is not None]
    if len(given) > 1:
        raise NodeError("LongCat-Image-Edit reads one picture; give it on the first image input", given[1][0])
    if not given:
        return (clip.encode(prompt),)
    full, vision = longcat.edit_pictures(_picture(ctx, given[0][1], given[0][0]))
    try:
        cond = longcat.encode_picture(clip, prompt, vision)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    if vae is not None:
        ref = vae.encode(qwen_image_edit.as_image(full))
        for _, extra in cond:
            extra[flux_references.LATENTS] = [*extra.get(flux_references.LATENTS, ()), ref]
    return (cond,)


@define_node(
    "TextEncodeQwenImageEdit",
    category="advanced/conditioning",
    inputs=[Input("clip", T.CLIP),
            Input("prompt", T.STRING, default="", multiline=True),
            Input("vae", T.VAE, optional=True, tooltip="Given, the picture's latent becomes a reference latent"),
            Input("image", T.IMAGE, optional=True, tooltip="The picture to edit (resized to about 1024x1024)")],
    outputs=COND,
)
def text_encode_qwen_image_edit(ctx, clip: Any, prompt: str, vae: Any = None, image: Any = None):
    """Qwen-Image-Edit's prompt: the picture read by the vision tower before the prompt, and with a
    VAE its latent as the reference (QwenImageEditPipeline's encoding)."""
    return _encode(ctx, clip, prompt, vae, [("image", image)], plus=False)


@define_node(
    "TextEncodeQwenImageEditPlus",
    category="advanced/conditioning",
    inputs=[Input("clip", T.CLIP),
            Input("prompt", T.STRING, default="", multiline=True),
            Input("vae", T.VAE, optional=True, tooltip="Given, each picture's latent becomes a reference latent"),
            Input("image1", T.IMAGE, optional=True),
            Input("image2", T.IMAGE, optional=True),
            Input("image3", T.IMAGE, optional=True)],
    outputs=COND,
)
def text_encode_qwen_image_edit_plus(ctx, clip: Any, prompt: str, vae: Any = None, image1: Any = None,
                                     image2: Any = None, image3: Any = None):
    """Qwen-Image-Edit 2509/2511's prompt: each picture named "Picture k:" and read at about 384x384,
    and with a VAE its latent at about 1024x1024 as reference k (QwenImageEditPlusPipeline's encoding)."""
    return _encode(ctx, clip, prompt, vae, [("image1", image1), ("image2", image2), ("image3", image3)], plus=True)
