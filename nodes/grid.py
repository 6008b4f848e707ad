"""ImageGrid: several images side by side, each under a label, in one IMAGE.

Made for comparisons such as workflows/strength-sweep.json (one init image at
several strengths): the point is to see the images next to each other with what
differs written under each, so the grid is composed at 8 bits with PIL, which
also draws the labels.
"""
from __future__ import annotations

import math
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, Result, define_node

MAX_IMAGES = 8


def _label_font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: Any, text: str, font: Any, width: int) -> str:
    """The label, shortened with an ellipsis until it fits the cell."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _items(images: list[Any]) -> list[Any]:
    """Every image of every batch, as [H,W,3] float tensors."""
    items = []
    for batch in images:
        if batch.ndim != 4:
            raise NodeError(f"expected an IMAGE [B,H,W,C], got shape {tuple(batch.shape)}")
        for item in batch:
            c = item.shape[-1]
            if c == 1:
                item = item.expand(-1, -1, 3)
            elif c == 4:
                item = item[..., :3]
            items.append(item)
    return items


@define_node(
    "ImageGrid",
    category="image",
    display_name="Image Grid",
    inputs=[
        Input("image1", T.IMAGE),
        *[Input(f"image{i}", T.IMAGE, optional=True) for i in range(2, MAX_IMAGES + 1)],
        Input("labels", T.STRING, default="", multiline=True,
              tooltip="One label per line, in image order (each image of a batch counts)"),
        Input("columns", T.INT, default=0, min=0, max=64, tooltip="0: as square as possible"),
    ],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_grid(ctx, image1, image2=None, image3=None, image4=None, image5=None, image6=None, image7=None,
               image8=None, labels: str = "", columns: int = 0):
    """Assemble the images into one labelled grid (cells sized to the largest image, centred)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from nodes.image_io import to_pil

    given = [im for im in (image1, image2, image3, image4, image5, image6, image7, image8) if im is not None]
    items = _items(given)
    n = len(items)
    if n == 0:
        raise NodeError("no images to put in the grid", "image1")
    cols = columns if columns > 0 else math.ceil(math.sqrt(n))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    cell_w = max(int(i.shape[1]) for i in items)
    cell_h = max(int(i.shape[0]) for i in items)
    texts = labels.splitlines() if labels else []
    gap = max(2, cell_w // 64)
    font_size = max(10, min(48, cell_w // 14))
    font = _label_font(font_size)
    band = int(font_size * 1.6) if any(t.strip() for t in texts) else 0
    width = cols * cell_w + (cols + 1) * gap
    height = rows * (cell_h + band) + (rows + 1) * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, item in enumerate(items):
        r, c = divmod(index, cols)
        x0 = gap + c * (cell_w + gap)
        y0 = gap + r * (cell_h + band + gap)
        h, w = int(item.shape[0]), int(item.shape[1])
        canvas.paste(to_pil(item), (x0 + (cell_w - w) // 2, y0 + (cell_h - h) // 2))
        if band and index < len(texts) and texts[index].strip():
            text = _fit_text(draw, texts[index].strip(), font, cell_w - 4)
            draw.text((x0 + cell_w / 2, y0 + cell_h + band / 2), text, fill=(0, 0, 0), font=font, anchor="mm")
    grid = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).unsqueeze(0)
    text = f"{n} images in {cols}x{rows} cells of {cell_w}x{cell_h}"
    ctx.message(text)
    return Result(outputs=(grid,), ui={"text": [text]})
