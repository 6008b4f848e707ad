"""ComfyUI's own frontend (comfyui-frontend-package 1.58.1) on ``kiln serve --frontend comfyui`` with
ComfyUI's own template utility_image_stitch.json, whose ResizeImageMaskNode has a dynamic combo
(``resize_type``): the frontend builds the chosen option's widgets from Kiln's /object_info, fills
them from the template, queues the prompt with the flat names Kiln runs (``resize_type.width``),
and builds a growing group's sockets (BatchImagesNode's ``images.image0`` ...); a Kiln workflow from
the library opens with its chosen option's values and its used sockets linked.

No model is needed: the template loads, stitches, resizes and saves images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from browser_support import Server, job_finished, launch_browser, open_comfy_frontend

pytestmark = [pytest.mark.browser, pytest.mark.slow]
MODEL_JOBS = False  # no model job runs here: its servers skip the model libraries' warm-up (conftest.server)
TEMPLATE = "utility_image_stitch.json"


def _template() -> dict[str, Any]:
    templates = pytest.importorskip("comfyui_workflow_templates_json")
    return json.loads((Path(templates.__file__).parent / "templates" / TEMPLATE).read_text())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    (tmp_path / "models").mkdir()
    srv = Server(tmp_path / "kiln", tmp_path / "models", workflows={"resize.json": json.dumps(KILN_DOC)},
                 frontend="comfyui", warm_up=MODEL_JOBS)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], start=1):
        Image.new("RGB", (24, 16), colour).save(srv.data / "input" / f"angle_{i}.png")  # the images it names
    try:
        yield {"url": srv.url, "dir": srv.root}
    finally:
        srv.stop()


#: A workflow in Kiln's library, in Kiln's format: the frontend gets it in its editor format.
KILN_DOC = {"version": 1, "nodes": {
    "1": {"type": "LoadImage", "inputs": {"image": "angle_1.png"}},
    "2": {"type": "ResizeImageMaskNode", "inputs": {"input": ["1", 0], "resize_type": "scale by multiplier",
                                                    "resize_type.multiplier": 0.5, "scale_method": "bicubic"}},
    "3": {"type": "BatchImagesNode", "inputs": {"images.image0": ["2", 0], "images.image1": ["2", 0]}},
    "4": {"type": "PreviewImage", "inputs": {"images": ["3", 0]}}}}

RESIZE_WIDGETS = """() => window.app.graph.nodes.find(n => n.type === 'ResizeImageMaskNode')
    .widgets.filter(w => w.serialize !== false).map(w => [w.name, w.value])"""

CHOOSE = """(choice) => { const n = window.app.graph.nodes.find(n => n.type === 'ResizeImageMaskNode');
    const w = n.widgets.find(w => w.name === 'resize_type'); w.value = choice; w.callback?.(choice); }"""

LOADER_WIDGETS = """() => window.app.graph.nodes.filter(n => n.type === 'LoadImage')
    .map(n => n.widgets.map(w => w.name))"""

ADD_BATCH = """() => { const n = window.LiteGraph.createNode('BatchImagesNode'); window.app.graph.add(n);
    const names = n.inputs.map(i => i.name); window.app.graph.remove(n); return names; }"""


def test_frontend_shows_and_queues_a_dynamic_combo(browser: Any, server: dict[str, Any]) -> None:
    url, folder = server["url"], server["dir"]
    template = _template()
    resize = next(n for n in template["nodes"] if n["type"] == "ResizeImageMaskNode")
    assert resize["widgets_values"] == ["scale dimensions", 2048, 2048, "center", "lanczos"]  # what we expect shown
    page, errors = open_comfy_frontend(browser, url, "ResizeImageMaskNode")
    page.evaluate("(doc) => window.app.loadGraphData(doc)", template)
    page.wait_for_function("() => window.app.graph.nodes.some(n => n.type === 'ResizeImageMaskNode')", timeout=30000)

    # the chosen option's widgets, right after the combo, with the template's values; no other option's
    assert page.evaluate(RESIZE_WIDGETS) == [["resize_type", "scale dimensions"], ["resize_type.width", 2048],
                                             ["resize_type.height", 2048], ["resize_type.crop", "center"],
                                             ["scale_method", "lanczos"]]

    # Kiln's LoadImage has an input ComfyUI's lacks (background); hidden from the frontend, which
    # would otherwise read the editor file's upload value ("image") into it and send it
    assert all("background" not in names for names in page.evaluate(LOADER_WIDGETS))

    with page.expect_request(lambda r: r.url.endswith("/prompt") and r.method == "POST", timeout=30000) as sent:
        page.evaluate("() => window.app.queuePrompt(0)")
    body = sent.value.post_data_json
    node_id = str(resize["id"])
    assert body["prompt"][node_id]["inputs"] == {
        "input": body["prompt"][node_id]["inputs"]["input"], "resize_type": "scale dimensions",
        "resize_type.width": 2048, "resize_type.height": 2048, "resize_type.crop": "center",
        "scale_method": "lanczos"}
    answer = sent.value.response()
    assert answer is not None and answer.ok, answer and answer.text()
    job_id = answer.json()["prompt_id"]
    job = job_finished(url, job_id)
    assert job["status"] == "succeeded", job["error"]
    saved = [img for out in job["outputs"].values() for img in out.get("images", [])]
    with Image.open(folder / "data" / "output" / saved[0]["filename"]) as image:
        assert image.size == (2048, 2048)

    # another option brings its own widgets and takes the old ones away
    page.evaluate(CHOOSE, "scale by multiplier")
    widgets = page.evaluate(RESIZE_WIDGETS)
    assert [w[0] for w in widgets] == ["resize_type", "resize_type.multiplier", "scale_method"]
    assert widgets[1][1] == 1.0  # Kiln's declared default

    # a growing group: the frontend offers its required sockets and one more, named as Kiln runs them
    assert page.evaluate(ADD_BATCH) == ["images.image0", "images.image1", "images.image2"]

    # a Kiln workflow from the library: the option's widgets and the used sockets, linked, as written
    page.evaluate("""async () => { const r = await fetch('/api/userdata/workflows%2Fresize.json');
        await window.app.loadGraphData(await r.json()); }""")
    page.wait_for_function("() => window.app.graph.nodes.some(n => n.type === 'BatchImagesNode')", timeout=30000)
    assert page.evaluate(RESIZE_WIDGETS) == [["resize_type", "scale by multiplier"], ["resize_type.multiplier", 0.5],
                                             ["scale_method", "bicubic"]]
    sockets = page.evaluate("""() => window.app.graph.nodes.find(n => n.type === 'BatchImagesNode')
        .inputs.map(i => [i.name, i.link !== null && i.link !== undefined])""")
    assert sockets[:2] == [["images.image0", True], ["images.image1", True]]
    assert not errors, errors
