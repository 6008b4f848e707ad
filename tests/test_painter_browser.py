"""ComfyUI's own frontend (comfyui-frontend-package) on ``kiln serve --frontend comfyui`` with a Painter node:
the frontend builds the node from Kiln's /object_info (its PAINTER and colour widgets, width and height
hidden), queues the prompt with the four widget values, and Kiln runs it: unpainted, a bg_color fill
of width x height; with a painting in the input folder named as the painter widget names its uploads,
the painting laid over that fill. And Kiln's own editor: the COLOR widget typed into, a painting chosen
with the mask input's upload button, and the preview.

No model is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from browser_support import Server, job_finished, open_comfy_frontend

pytestmark = [pytest.mark.browser, pytest.mark.slow]
MODEL_JOBS = False  # no model job runs here: its servers skip the model libraries' warm-up (conftest.server)


@pytest.fixture
def comfy_frontend(tmp_path: Path) -> Iterator[Server]:
    """``kiln serve --frontend comfyui`` (no model needed) with a painting in its input folder."""
    (tmp_path / "models").mkdir()
    srv = Server(tmp_path / "kiln", tmp_path / "models", workflows={}, frontend="comfyui",
                 warm_up=MODEL_JOBS)
    rgba = np.zeros((64, 128, 4), dtype=np.uint8)
    rgba[:, :64] = (255, 0, 0, 255)  # left half painted red, right half untouched
    Image.fromarray(rgba, "RGBA").save(srv.data / "input" / "painter-5-1787.png")
    yield srv
    srv.stop()


BUILD = """() => { const p = window.LiteGraph.createNode('Painter'); window.app.graph.add(p);
    const v = window.LiteGraph.createNode('PreviewImage'); window.app.graph.add(v); p.connect(0, v, 0);
    for (const [name, value] of [['width', 128], ['height', 64], ['bg_color', '#0000ff']])
        p.widgets.find(w => w.name === name).value = value;
    return [p.id, v.id, p.widgets.map(w => [w.name, w.type, !!w.options?.hidden])]; }"""


def _queue(page: Any, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    with page.expect_request(lambda r: r.url.endswith("/prompt") and r.method == "POST", timeout=30000) as sent:
        page.evaluate("() => window.app.queuePrompt(0)")
    answer = sent.value.response()
    assert answer is not None and answer.ok, answer and answer.text()
    return sent.value.post_data_json, job_finished(url, answer.json()["prompt_id"])


def _preview(folder: Path, job: dict[str, Any], node_id: int) -> np.ndarray:
    """The picture a node of the job previewed (Painter previews its output, as PreviewImage does)."""
    (shown,) = job["outputs"][str(node_id)]["images"]
    with Image.open(folder / "data" / shown["type"] / shown["subfolder"] / shown["filename"]) as image:
        return np.asarray(image.convert("RGB"))


def test_the_frontend_builds_queues_and_kiln_runs_a_painter(browser: Any, comfy_frontend: Server) -> None:
    url, folder = comfy_frontend.url, comfy_frontend.root
    page, errors = open_comfy_frontend(browser, url, "Painter")
    page.evaluate("() => window.app.graph.clear()")
    node_id, preview_id, widgets = page.evaluate(BUILD)
    # the frontend's own painter and colour widgets, built from the extras and the COLOR type Kiln declares
    assert [w[:2] for w in widgets] == [["mask", "painter"], ["width", "number"], ["height", "number"],
                                        ["bg_color", "color"]]
    assert [w[2] for w in widgets[:3]] == [False, True, True]  # width and height hidden, as Kiln declares

    body, job = _queue(page, url)
    inputs = body["prompt"][str(node_id)]["inputs"]
    assert {k: inputs[k] for k in ("width", "height", "bg_color")} == {"width": 128, "height": 64,
                                                                       "bg_color": "#0000ff"}
    assert inputs["mask"] == "" or inputs["mask"].startswith("painter-")  # unpainted, or the blank canvas uploaded
    assert job["status"] == "succeeded", job["error"]
    shown = _preview(folder, job, preview_id)
    assert np.array_equal(_preview(folder, job, node_id), shown)
    assert shown.shape == (64, 128, 3) and (shown[:, 64:] == (0, 0, 255)).all()

    # a painting as the painter widget names its uploads: laid over the fill
    page.evaluate(f"""() => {{ const p = window.app.graph.getNodeById({node_id});
        p.widgets.find(w => w.name === 'mask').value = 'painter-5-1787.png [input]'; }}""")
    body, job = _queue(page, url)
    assert body["prompt"][str(node_id)]["inputs"]["mask"] == "painter-5-1787.png [input]"
    assert job["status"] == "succeeded", job["error"]
    shown = _preview(folder, job, preview_id)
    assert (shown[:, :64] == (255, 0, 0)).all() and (shown[:, 64:] == (0, 0, 255)).all()
    assert not errors, errors


def test_painter_in_kiln_s_editor_uploads_a_painting_and_runs(editor, server, tmp_path: Path):
    """Kiln's own editor: Painter from the palette, its colour typed into the COLOR widget, a painting
    chosen with the mask input's upload button (stored in the input folder, its name put in ``mask``),
    and the preview shows the painting over the fill."""
    import io
    import urllib.request

    page = editor.page
    page.click("#new")
    painter = editor.add_node("painter", 40, 40)
    preview = editor.add_node("preview image", 420, 40)
    node = editor.node(painter)
    for name, value in (("bg_color", "#0000ff"), ("width", "128"), ("height", "64")):
        field = node.locator(f'.widget-row[data-input="{name}"] input').first
        field.fill(value)
        field.press("Enter")
    rgba = np.zeros((64, 128, 4), dtype=np.uint8)
    rgba[:, :64] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "painting.png")
    with page.expect_response(lambda r: "/upload/image" in r.url and r.request.method == "POST"):
        node.locator('.widget-row[data-input="mask"] input.upload-file').set_input_files(str(tmp_path / "painting.png"))
    editor.link(painter, 0, preview, "images")
    inputs = editor.doc()["nodes"][painter]["inputs"]
    assert inputs["bg_color"] == "#0000ff" and (inputs["width"], inputs["height"]) == (128, 64)
    assert inputs["mask"].startswith("painting") and (server.data / "input" / inputs["mask"]).is_file()

    page.click("#run")
    editor.wait_output_image(preview)
    editor.wait_idle()
    src = editor.node(preview).locator(".node-media img.output").get_attribute("src")
    shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(server.url + src).read())).convert("RGB"))
    assert shown.shape == (64, 128, 3)
    assert (shown[:, :64] == (255, 0, 0)).all() and (shown[:, 64:] == (0, 0, 255)).all()
