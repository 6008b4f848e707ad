"""The mask painter (issue 11 item 8) in Chromium against a real ``kiln serve`` with the tiny model.

Paint and erase at two zooms, undo, invert, clear; save through ``/upload/mask`` in
ComfyUI's wire form; the file's alpha is the painted region, reopening reads it
back, and a run of the repository's ``workflows/inpaint.json`` (shrunk to the tiny
model) repaints the painted region: LoadImage's MASK output equals the painted
region pixel for pixel, and every pixel outside the grown mask is the picture's own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from browser_support import REPO, TINY_CKPT

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def inpaint_graph() -> dict[str, Any]:
    """workflows/inpaint.json on the tiny model (3 euler steps), also saving the painted and grown masks."""
    doc = json.loads((REPO / "workflows" / "inpaint.json").read_text())
    nodes = doc["nodes"]
    types = {node["type"]: node_id for node_id, node in nodes.items()}
    assert {"LoadImage", "GrowMask", "KSampler", "ImageCompositeMasked", "SaveImage"} <= set(types)
    nodes[types["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = TINY_CKPT
    nodes[types["KSampler"]]["inputs"].update(steps=3, sampler_name="euler", scheduler="normal")
    nodes[types["LoadImage"]]["inputs"]["background"] = "none"  # the stored colours, as ComfyUI's LoadImage
    for node_id, mask, prefix, y in (("21", [types["LoadImage"], 1], "painted-mask", 900),
                                     ("23", [types["GrowMask"], 0], "grown-mask", 1200)):
        nodes[node_id] = {"type": "MaskToImage", "inputs": {"mask": mask}, "ui": {"pos": [1500, y]}}
        nodes[str(int(node_id) + 1)] = {"type": "SaveImage", "inputs": {
            "images": [node_id, 0], "filename_prefix": prefix}, "ui": {"pos": [1800, y]}}
    return doc


class Painter:
    """The open painter, driven with the real mouse and keyboard."""

    def __init__(self, page: Any) -> None:
        self.page = page

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Client coordinates of the centre of picture pixel (x, y), at the current zoom."""
        return tuple(self.page.evaluate(
            """([x, y]) => { const c = document.querySelector('.mask-canvas'), r = c.getBoundingClientRect();
                             return [r.left + (x + .5) * r.width / c.width, r.top + (y + .5) * r.height / c.height]; }""",
            [x, y]))

    def stroke(self, *pixels: tuple[float, float]) -> None:
        m = self.page.mouse
        m.move(*self.point(*pixels[0]))
        m.down()
        for p in pixels[1:]:
            m.move(*self.point(*p), steps=6)
        m.up()

    def bits(self) -> np.ndarray:
        size = self.page.evaluate("[document.querySelector('.mask-canvas').width, document.querySelector('.mask-canvas').height]")
        flat = self.page.evaluate("window.kiln.app.maskPainter.maskBits()")
        return np.array(flat, dtype=np.uint8).reshape(size[1], size[0])

    def scale(self) -> float:
        return self.page.evaluate("window.kiln.app.maskPainter.scale")


def open_painter(editor: Any, node_id: str = "4") -> Painter:
    editor.node(node_id).locator(".mask-button").click()
    editor.page.locator(".mask-painter .mask-canvas").wait_for(state="visible")
    return Painter(editor.page)


def test_paint_save_reopen_and_inpaint_keeps_the_unmasked_pixels(editor, server):
    page = editor.page
    page.evaluate("doc => window.kiln.app.files.loadDocument(doc, null)", inpaint_graph())
    page.wait_for_function("window.kiln.graph.node('24') !== undefined")
    painter = open_painter(editor)
    assert painter.bits().sum() == 0, "sample.png has no transparency: nothing painted yet"

    # Brush of 6 px; zoom in at the pointer, then paint a horizontal stroke.
    page.locator(".mask-size").fill("6")
    assert page.locator(".mask-size-value").text_content() == "6 px"
    fitted = painter.scale()
    page.mouse.move(*painter.point(30, 20))
    for _ in range(3):
        page.mouse.wheel(0, -100)
    assert painter.scale() > fitted * 1.4
    painter.stroke((10, 20), (40, 20))
    bits = painter.bits()
    assert bits[20, 10] == bits[20, 25] == bits[20, 40] == 1
    assert bits[20, 5] == 0 and bits[27, 25] == 0 and bits[13, 25] == 0, "the brush is 6 px wide, no wider"
    # Zoomed out (a pinch: ctrl + wheel) the same brush paints the same pixels under the cursor.
    page.mouse.move(*painter.point(32, 32))
    page.keyboard.down("Control")
    page.mouse.wheel(0, 40)
    page.mouse.wheel(0, 40)
    page.keyboard.up("Control")
    assert painter.scale() < fitted
    painter.stroke((50, 40), (50, 55))
    bits = painter.bits()
    assert bits[40, 50] == bits[48, 50] == bits[55, 50] == 1 and bits[48, 56] == 0
    editor.screenshot("mask-painter-painted")

    # Erase a gap in the first stroke; undo brings it back.
    painted = painter.bits()
    page.click(".mask-erase")
    painter.stroke((25, 20), (26, 20))
    assert painter.bits()[20, 25] == 0 and painter.bits()[20, 10] == 1
    page.keyboard.press("Control+z")
    assert np.array_equal(painter.bits(), painted)
    # Invert, then undo; clear, then undo.
    page.click(".mask-invert")
    assert np.array_equal(painter.bits(), 1 - painted)
    page.click(".mask-undo")
    assert np.array_equal(painter.bits(), painted)
    page.click(".mask-clear")
    assert painter.bits().sum() == 0
    page.click(".mask-undo")
    assert np.array_equal(painter.bits(), painted)
    assert 150 < painted.sum() < 64 * 64 / 2

    # Save: the node now loads the masked copy in input/clipspace, as ComfyUI's editor saves it.
    page.click(".mask-save")
    page.locator(".mask-painter").wait_for(state="detached")
    value = editor.doc()["nodes"]["4"]["inputs"]["image"]
    assert value.startswith("clipspace/clipspace-mask-") and value.endswith(".png"), value
    stored = Image.open(server.data / "input" / value)
    assert stored.mode == "RGBA"
    alpha = np.asarray(stored.getchannel("A"))
    assert np.array_equal(alpha, np.where(painted == 1, 0, 255)), "transparent exactly where painted"
    original = np.asarray(Image.open(server.data / "input" / "sample.png").convert("RGB"))
    assert np.array_equal(np.asarray(stored.convert("RGB")), original), "the picture itself is unchanged"
    page.click("#undo")
    assert editor.doc()["nodes"]["4"]["inputs"]["image"] == "sample.png", "saving the mask is one undo step"
    page.click("#redo")
    assert editor.doc()["nodes"]["4"]["inputs"]["image"] == value

    # Reopening reads the mask back from the file's alpha.
    painter = open_painter(editor)
    assert np.array_equal(painter.bits(), painted)
    page.keyboard.press("Escape")
    page.locator(".mask-painter").wait_for(state="detached")
    assert editor.doc()["nodes"]["4"]["inputs"]["image"] == value, "cancel changes nothing"

    # Run: MASK is the painted region exactly; the result is repainted inside the grown mask and
    # every pixel outside it is the picture's own (the workflow pastes the repaint back through it).
    page.click("#run")
    editor.wait_output_image("11")
    editor.wait_output_image("22")
    editor.wait_output_image("24")
    out = Path(server.data / "output")

    def newest(prefix: str) -> np.ndarray:
        return np.asarray(Image.open(max(out.glob(f"{prefix}_*.png"), key=lambda p: p.stat().st_mtime)).convert("RGB"))

    assert np.array_equal(newest("painted-mask")[..., 0] > 127, painted == 1)
    grown = newest("grown-mask")[..., 0] > 127
    assert grown[painted == 1].all() and grown.sum() > painted.sum(), "GrowMask widens the painted region"
    result = newest("inpaint").astype(int)
    outside = ~grown
    assert np.array_equal(result[outside], original[outside].astype(int))
    assert np.abs(result[painted == 1] - original[painted == 1].astype(int)).mean() > 8, "the region was repainted"
    assert page.evaluate("window.kiln.app.maskPainter.isOpen") is False
