"""Small nodes that ComfyUI's templates and clients use: GetImageSize, PreviewAny,
SaveImageWebsocket. Inputs, outputs and behaviour follow ComfyUI's own nodes
(``comfy_extras/nodes_images.py``, ``nodes_preview_any.py`` and
``custom_nodes/websocket_image_save.py``).
"""
from __future__ import annotations

import io
import json
from typing import Any

from engine import types as T
from engine.events import Preview
from engine.node import ALWAYS, Input, Output, Result, define_node


@define_node("GetImageSize", category="image", display_name="Get Image Size",
             inputs=[Input("image", T.IMAGE)],
             outputs=[Output("width", T.INT), Output("height", T.INT), Output("batch_size", T.INT)])
def get_image_size(ctx, image):
    """The image's width, height and batch size; also shown on the node."""
    batch, height, width = int(image.shape[0]), int(image.shape[1]), int(image.shape[2])
    ctx.message(f"width: {width}, height: {height}\n batch size: {batch}")
    return (width, height, batch)


def preview_text(value: Any) -> str:
    """How PreviewAny shows a value: text as is, numbers and booleans as str(), the rest as JSON."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        try:
            return str(value)
        except Exception:  # noqa: BLE001 - a preview must never fail the job
            return "source exists, but could not be serialized."


@define_node("PreviewAny", category="utils", display_name="Preview Any", output_node=True,
             inputs=[Input("source", T.ANY)], outputs=[Output("STRING", T.STRING)])
def preview_any(ctx, source):
    """Show any value as text in the job's outputs (``{"text": [...]}``, as ComfyUI reports it),
    and pass the text on (ComfyUI's newer PreviewAny has this output; templates use it)."""
    text = preview_text(source)
    return Result(outputs=(text,), ui={"text": [text]})


def _png(image) -> tuple[bytes, int, int]:
    import numpy as np
    from PIL import Image

    pixels = np.clip(image.detach().cpu().float().numpy() * 255.0, 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0])
    out = io.BytesIO()
    im.save(out, format="PNG", compress_level=1)
    return out.getvalue(), im.width, im.height


@define_node("SaveImageWebsocket", category="api/image", display_name="Save Image (Websocket)", output_node=True,
             inputs=[Input("images", T.IMAGE)], fingerprint=lambda env, inputs: ALWAYS)
def save_image_websocket(ctx, images):
    """Send each image, full size, as a PNG in a binary websocket frame instead of a file.

    The frame is ComfyUI's preview frame (4 bytes event type 1, 4 bytes image type
    2 = PNG, then the PNG), which its websocket example client reads; Kiln's own
    protocol carries it as a preview marked ``output``. Nothing is written to disk
    and no metadata is embedded. Like ComfyUI's node it runs every time (never from
    the cache), since its result is a message, not a value.
    """
    total = int(images.shape[0])
    for index in range(total):
        data, width, height = _png(images[index])
        ctx.progress(index, total, Preview(data, "image/png", width, height, output=True))
    return ()
