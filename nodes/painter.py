"""ComfyUI's ``Painter`` node: a picture painted in the frontend, laid over a base picture.

Why here: ComfyUI's official frontend (the one Kiln serves) has a PAINTER widget that paints a
picture, uploads it and puts its annotated name ("painter-3-1787.png [input]",
"painter/painter-694-1784.png [temp]") in the node's ``mask`` input; six of ComfyUI's templates use
the node. Without it, a user who paints in that frontend gets "unknown node type".

The painting is an RGBA file: its colours are laid over the base where its alpha says
(out = rgb * alpha + base * (1 - alpha)), and the alpha is the MASK. The base is the linked
image's first picture, or a width x height picture filled with ``bg_color``. The file is found
as LoadImage finds its file (input, temp or output folder; escapes refused) and the node's
fingerprint is its content, so repainting re-runs what follows and nothing else does.
"""
from __future__ import annotations

from typing import Any, Mapping

from engine import types as T
from engine.context import Environment, NodeError
from engine.node import Input, Output, Result, define_node
from nodes import image as _image_nodes
from nodes import image_io as io_


def _painted(value: Any) -> bool:
    """Whether ``mask`` names a painting (an empty widget means nothing was painted)."""
    return isinstance(value, str) and bool(value.strip())


def _painter_validate(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    value = inputs.get("mask", "")
    if not _painted(value):
        return []
    try:
        io_.locate_file(env, value, "mask", "painting")
    except NodeError as exc:
        return [("mask", str(exc))]
    return []


def _painter_fingerprint(env: Environment, inputs: Mapping[str, Any]) -> str:
    # The painting's content, as LoadImage's fingerprint (nodes.image): a repaint saved under
    # the same name re-runs, a mere touch does not.
    value = inputs.get("mask", "")
    return io_.file_sha256(io_.locate_file(env, value, "mask", "painting")) if _painted(value) else ""


def base_picture(image: Any, width: int, height: int, bg_color: str) -> Any:
    """The picture painted over: ``image``'s first picture (RGB), or a ``bg_color`` fill of width x height."""
    import torch

    if image is not None:
        return image[:1, ..., :3].detach().to("cpu", torch.float32)
    rgb = T.parse_color(bg_color)
    if rgb is None:
        raise NodeError(f"'{bg_color}' is not a colour; write it as #rrggbb", "bg_color")
    fill = torch.tensor(rgb, dtype=torch.float32) / 255.0
    return fill.expand(1, int(height), int(width), 3).contiguous()


@define_node(
    "Painter",
    category="image",
    display_name="Painter",
    inputs=[
        Input("image", T.IMAGE, optional=True, tooltip="Optional base image to paint over"),
        Input("mask", T.STRING, default="",
              extra={"socketless": True, "widgetType": "PAINTER", "image_upload": True},
              tooltip="The painting (an RGBA file the frontend's painter uploads); empty: nothing painted"),
        Input("width", T.INT, default=512, min=64, max=4096, step=64, extra={"socketless": True, "hidden": True}),
        Input("height", T.INT, default=512, min=64, max=4096, step=64, extra={"socketless": True, "hidden": True}),
        Input("bg_color", T.COLOR, default="#000000"),
    ],
    outputs=[Output("IMAGE", T.IMAGE), Output("MASK", T.MASK, tooltip="The painting's alpha")],
    validate=_painter_validate,
    fingerprint=_painter_fingerprint,
)
def painter(ctx, mask: str = "", width: int = 512, height: int = 512, bg_color: str = "#000000",
            image: Any = None) -> Result:
    """The painting laid over the base, and its alpha as MASK; previewed as PreviewImage does.

    The painting is resized to the base's size with Lanczos where it differs. Without a painting
    the base comes out as it is, with a zero mask of its size.
    """
    import numpy as np
    import torch
    from PIL import Image

    base = base_picture(image, width, height, bg_color)
    h, w = int(base.shape[1]), int(base.shape[2])
    if _painted(mask):
        path = io_.locate_file(ctx.env, mask, "mask", "painting")
        im = io_.open_image(path, f"'{mask}'", ctx.env.settings.max_image_pixels, "mask").convert("RGBA")
        if im.size != (w, h):
            im = im.resize((w, h), resample=Image.Resampling.LANCZOS)
        rgba = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).unsqueeze(0)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        out = rgb * alpha + base * (1.0 - alpha)
        mask_t = alpha[..., 0].contiguous()
    else:
        out, mask_t = base, torch.zeros((1, h, w), dtype=torch.float32)
    preview = _image_nodes.preview_image.fn(ctx, out)
    return Result(outputs=(out, mask_t), ui=preview.ui)
