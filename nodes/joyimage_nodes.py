"""TextEncodeJoyImageEdit with ComfyUI's name and inputs: a prompt and up to six pictures for JoyImage Edit.

Each picture gets its size bucket (nodes.families.joyimage.bucketed: the pipeline's cover-and-crop) and
is read by Qwen3-VL's vision tower with the prompt; given a VAE, each bucketed picture's latent goes on
the CONDITIONING as a reference latent (ReferenceLatent's key), which the JoyImage transformer reads as
the frames after the image it makes. Without pictures the prompt is encoded as CLIPTextEncode does.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Grow, Input, Output, define_node
from nodes.handles import ClipHandle, VaeHandle

#: ComfyUI's growing picture sockets: images.image0 .. images.image5, none required.
IMAGES = Grow("images", min=0, prefix="image", count=6, template="image")
IMAGE_SLOTS = [f"images.{name}" for name in IMAGES.slot_names()]


def _picture(image: Any, name: str) -> Any:
    """One IMAGE input as a PIL picture: ComfyUI takes one picture per input and refuses a batch."""
    from nodes.families.qwen_image_edit import to_pil

    if getattr(image, "ndim", None) != 4 or image.shape[-1] < 3:
        raise NodeError("is not an IMAGE ([batch, height, width, 3])", name)
    if image.shape[0] != 1:
        raise NodeError(f"holds {image.shape[0]} images; JoyImage reads one picture per input "
                        "(link each picture to its own images input)", name)
    return to_pil(image[0])


@define_node(
    "TextEncodeJoyImageEdit",
    category="model/conditioning/joyimage",
    inputs=[Input("clip", T.CLIP),
            Input("prompt", T.STRING, default="", multiline=True),
            Input("vae", T.VAE, optional=True, tooltip="Given, each picture's latent becomes a reference latent"),
            *IMAGES.inputs(T.IMAGE, tooltip="A picture to edit (resized to the nearest of JoyImage's size buckets)")],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def text_encode_joyimage_edit(ctx, clip: Any, prompt: str, vae: Any = None, **images: Any):
    """JoyImage Edit's prompt: the pictures read by the vision tower before it and, with a VAE, their
    latents as references (JoyImageEditPipeline's encoding)."""
    from nodes.families import flux_references, joyimage
    from nodes.families.base import ConditioningError
    from nodes.families.qwen_image_edit import as_image

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a CLIP loader, got {type(clip).__name__}", "clip")
    if clip.family.name != joyimage.FAMILY.name:
        raise NodeError(f"this CLIP is {clip.family.name}'s; TextEncodeJoyImageEdit needs JoyImage's Qwen3-VL 8B "
                        "(CLIPLoader type joyimage on qwen3vl_8b_joyimage_edit*.safetensors)", "clip")
    if not isinstance(prompt, str):
        raise NodeError("must be a string", "prompt")
    if vae is not None and not isinstance(vae, VaeHandle):
        raise NodeError(f"vae must come from a VAE loader, got {type(vae).__name__}", "vae")
    pictures = [joyimage.bucketed(_picture(images[name], name)) for name in IMAGE_SLOTS
                if images.get(name) is not None]
    try:
        cond = joyimage.encode_pictures(clip, prompt, pictures)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    if vae is not None and pictures:
        refs = [vae.encode(as_image(p)) for p in pictures]
        for _, extra in cond:
            extra[flux_references.LATENTS] = [*extra.get(flux_references.LATENTS, ()), *refs]
    return (cond,)
