"""A small picture of a workflow graph: the thumbnail ComfyUI's template panel shows.

Kiln's shipped workflows have no sample output to show (their images depend on
the model the user has), so the thumbnail draws the graph itself: one box per
node at its editor position, titled by its type, and a line per link.
"""
from __future__ import annotations

import io
from typing import Any

SIZE = (512, 384)
BACKGROUND, NODE, EDGE, TEXT = (24, 24, 27), (58, 58, 66), (120, 170, 230), (230, 230, 235)


def graph_thumbnail(doc: dict[str, Any]) -> bytes:
    """PNG bytes of the editor-format workflow ``doc`` fitted into SIZE."""
    from PIL import Image, ImageDraw

    nodes = [n for n in doc.get("nodes", []) if isinstance(n, dict)]
    im = Image.new("RGB", SIZE, BACKGROUND)
    if not nodes:
        out = io.BytesIO()
        im.save(out, "PNG")
        return out.getvalue()
    boxes = {}
    for n in nodes:
        x, y = (n.get("pos") or [0, 0])[:2]
        w, h = (n.get("size") or [200, 100])[:2]
        boxes[n["id"]] = (float(x), float(y), float(x) + float(w), float(y) + float(h))
    left = min(b[0] for b in boxes.values())
    top = min(b[1] for b in boxes.values())
    right = max(b[2] for b in boxes.values())
    bottom = max(b[3] for b in boxes.values())
    margin = 16
    scale = min((SIZE[0] - 2 * margin) / max(right - left, 1), (SIZE[1] - 2 * margin) / max(bottom - top, 1))

    def fit(x: float, y: float) -> tuple[float, float]:
        return margin + (x - left) * scale, margin + (y - top) * scale

    draw = ImageDraw.Draw(im)
    for link in doc.get("links", []):
        if isinstance(link, list) and len(link) >= 5 and link[1] in boxes and link[3] in boxes:
            a, b = boxes[link[1]], boxes[link[3]]
            draw.line([fit(a[2], (a[1] + a[3]) / 2), fit(b[0], (b[1] + b[3]) / 2)], fill=EDGE, width=2)
    for n in nodes:
        x0, y0, x1, y1 = boxes[n["id"]]
        draw.rounded_rectangle([fit(x0, y0), fit(x1, y1)], radius=4, fill=NODE, outline=EDGE)
        draw.text(fit(x0 + 8 / scale, y0 + 6 / scale), str(n.get("title") or n.get("type") or "")[:22], fill=TEXT)
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()
