"""Issue 14's remainder in Chromium against a real Kiln server with the tiny model:
reroute points dragged by their handles, the wheel zoom's rule (proportional,
deltaMode, pinch), and the viewer's A/B between a result and its input picture.
"""
from __future__ import annotations

import math
import time
from typing import Any

import pytest

from browser_support import RUN_TIMEOUT_MS, http_json, tiny_img2img

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_reroute_points_drag_by_their_handle_undo_and_remove(editor):
    page = editor.page
    mid = page.evaluate("""() => { const p = document.querySelector('svg.links path.link[data-to="5"]');
        const q = p.getPointAtLength(p.getTotalLength() / 2); return window.kiln.view.toClient(q.x, q.y); }""")
    page.mouse.click(*mid, button="right")
    page.click('.context-menu .menu-item[data-action="reroute"]')
    (point,) = editor.doc()["nodes"]["5"]["ui"]["routes"]["image"]
    editor.drawn()
    handle = page.locator('svg.links circle.reroute[data-to="5"][data-input="image"]')
    assert handle.count() == 1
    box = handle.bounding_box()
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    editor.drag(centre, (centre[0] + 90, centre[1] + 60))
    editor.drawn()
    scale = page.evaluate("window.kiln.view.scale")
    (moved,) = editor.doc()["nodes"]["5"]["ui"]["routes"]["image"]
    assert abs(moved[0] - (point[0] + 90 / scale)) <= 1 and abs(moved[1] - (point[1] + 60 / scale)) <= 1
    # The drawn link passes through the moved point; the handle followed it.
    near = page.evaluate("""([x, y]) => { const p = document.querySelector('svg.links path.link[data-to="5"]');
        let best = 1e9; const n = p.getTotalLength();
        for (let s = 0; s <= n; s += 1) { const q = p.getPointAtLength(s); best = Math.min(best, Math.hypot(q.x - x, q.y - y)); }
        return best; }""", moved)
    assert near < 2
    editor.screenshot("reroute-dragged")
    page.keyboard.press("Control+z")
    assert editor.doc()["nodes"]["5"]["ui"]["routes"]["image"] == [point], "one drag, one undo step"
    editor.drawn()  # the handle back where the undo put it before it is double-clicked
    box = handle.bounding_box()
    page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert "routes" not in editor.doc()["nodes"]["5"]["ui"]
    editor.drawn()  # the document is ahead of the drawing by one frame (a fresh-clone run once saw it)
    assert handle.count() == 0


def wheel(page: Any, x: float, y: float, dy: float, mode: int = 0, ctrl: bool = False) -> None:
    """One wheel event as a device reports it (Playwright's mouse.wheel sends pixels only)."""
    page.evaluate("""([x, y, dy, mode, ctrl]) => document.elementFromPoint(x, y).dispatchEvent(new WheelEvent('wheel',
        { clientX: x, clientY: y, deltaY: dy, deltaMode: mode, ctrlKey: ctrl, bubbles: true, cancelable: true }))""",
                  [x, y, dy, mode, ctrl])


def test_wheel_zoom_is_proportional_handles_lines_and_pinch_and_keeps_the_point_under_the_pointer(editor):
    page = editor.page
    x, y = editor.canvas_point(700, 420)
    scale = lambda: page.evaluate("window.kiln.view.scale")  # noqa: E731
    world = lambda: page.evaluate("([x, y]) => window.kiln.view.toWorld(x, y)", [x, y])  # noqa: E731
    page.mouse.move(x, y)
    before, anchor = scale(), world()
    wheel(page, x, y, 10)  # a trackpad's small step: a small change, not a whole notch
    assert scale() / before == pytest.approx(math.exp(-10 * 0.0015), rel=1e-6)
    before = scale()
    wheel(page, x, y, 3, mode=1)  # Firefox: three lines per notch
    assert scale() / before == pytest.approx(math.exp(-48 * 0.0015), rel=1e-6)
    before = scale()
    wheel(page, x, y, 2000)  # a flick is capped
    assert scale() / before == pytest.approx(math.exp(-100 * 0.0015), rel=1e-6)
    before = scale()
    wheel(page, x, y, -8, ctrl=True)  # a pinch: small deltas, larger gain
    assert scale() / before == pytest.approx(math.exp(8 * 0.01), rel=1e-6)
    assert world() == pytest.approx(anchor, abs=0.01), "the point under the pointer stays put"


def test_viewer_compares_a_result_with_its_input_picture(editor, server):
    page = editor.page
    job = http_json(server.url, "POST", "/api/jobs", {"workflow": tiny_img2img("input vs result", 0.7)})
    # The server's first job loads the model: on a loaded 2-core machine that can take minutes.
    deadline = time.monotonic() + 4 * RUN_TIMEOUT_MS / 1000
    while (state := http_json(server.url, "GET", f"/api/jobs/{job['job_id']}"))["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "succeeded", state
    listed = http_json(server.url, "GET", "/api/history?limit=5")["jobs"][0]
    assert listed["input_images"] == [{"filename": "sample.png", "subfolder": "", "type": "input"}]
    page.reload()
    page.wait_for_function("document.body.classList.contains('ready')", timeout=20_000)
    page.locator("#gallery-list img").first.click()
    page.locator(".viewer").wait_for()
    page.click(".viewer-compare")
    b = page.locator(".viewer-img-b")
    page.wait_for_function("document.querySelector('.viewer-img-b').naturalWidth > 0")
    assert "type=input" in b.evaluate("e => e.src") and "filename=sample.png" in b.evaluate("e => e.src")
    options = page.locator(".viewer-b option").all_text_contents()
    assert options[0] == "B: input sample.png"
    assert page.locator(".viewer-b").input_value() == "in:0"
    page.locator(".viewer-slider").fill("40")
    assert page.evaluate("document.querySelector('.viewer-img').style.clipPath") == "inset(0px 60% 0px 0px)"
    editor.screenshot("viewer-input-vs-result")
    page.keyboard.press("Escape")
    page.locator(".viewer").wait_for(state="detached")
