"""ComfyUI's official frontend (comfyui-frontend-package 1.58.1, installed by the dev requirements)
served by ``kiln serve --frontend comfyui``, driven in Debian's Chromium through Playwright.

From a fresh server: the page loads with no failed request, no console error and no request
leaving the machine; Kiln's img2img opens from the templates panel; an image is uploaded through
the LoadImage node's upload button; Run queues it; progress arrives and the result shows on the
SaveImage node; the assets panel lists the result; a workflow saved in the frontend lands in
Kiln's library and opens in Kiln's editor at /kiln/.

The diffusion part runs on a tiny random SD1 checkpoint; the workflow's sizes are cut to 64 px
and 3 steps in the page (the shipped 512 px / 20 steps take minutes on a busy 2-core machine).
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from browser_support import Server, job_finished, launch_browser

pytestmark = [pytest.mark.browser, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
CKPT = "v1-5-pruned-emaonly.safetensors"  # the name workflows/img2img.json asks for


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh ``kiln serve --frontend comfyui`` (no saved workflows, so the templates panel opens)."""
    import tiny_models as tiny

    tiny.save_single_file("sd1", tmp_path / "models" / "checkpoints" / CKPT)
    Image.new("RGB", (96, 80), (30, 120, 200)).save(tmp_path / "upload.png")
    srv = Server(tmp_path / "kiln", tmp_path / "models", workflows={}, frontend="comfyui")
    try:
        yield {"url": srv.url, "dir": srv.root, "upload": tmp_path / "upload.png"}
    finally:
        srv.stop()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def _warm_up(url: str) -> None:
    """Import torch and load the checkpoint while the page loads (a different seed: nothing is shared
    with the browser's job but the loaded model and the text encodings)."""
    from engine.registry import default_registry
    from engine.formats import parse_document as parse

    prompt = parse(json.loads((REPO / "workflows" / "img2img.json").read_text()), default_registry()).to_api()
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["8"]["inputs"].update(steps=1, seed=1)
    prompt["7"]["inputs"].update(seed=1)
    _post(f"{url}/prompt", {"prompt": prompt})


SHRINK = """() => {
  const g = window.app.graph;
  const set = (type, name, value) => { const w = g.nodes.find(n => n.type === type).widgets.find(w => w.name === name);
                                       w.value = value; w.callback?.(value); };
  set('ImageResize', 'width', 64); set('ImageResize', 'height', 64); set('KSampler', 'steps', 3);
  window.app.canvas.setDirty(true, true);
}"""

UPLOAD_BUTTON = """() => {
  const app = window.app, n = app.graph.nodes.find(n => n.type === 'LoadImage');
  const w = n.widgets.find(w => w.name === 'upload'), r = app.canvas.canvas.getBoundingClientRect();
  const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + (w.y ?? w.last_y) + 10]);
  return [r.left + x, r.top + y];
}"""


def test_official_frontend_runs_kilns_img2img(browser: Any, server: dict[str, Any]) -> None:
    url, folder = server["url"], server["dir"]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    failed, errors, outside, frames = [], [], [], []
    ok_status: dict[str, int] = {}

    def on_response(r: Any) -> None:
        ok_status[r.url] = r.status
        if r.status >= 400:
            failed.append((r.status, r.url))

    def on_failed(r: Any) -> None:
        # The frontend drops the (empty) body of answered POSTs it does not read: Chromium calls
        # that ERR_ABORTED. Only a request that got no successful answer counts as failed.
        if not (r.failure == "net::ERR_ABORTED" and ok_status.get(r.url, 999) < 400):
            failed.append((r.failure, r.url))

    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(f) if isinstance(f, str) else None))
    page.route(lambda u: not u.startswith(url), lambda route: (outside.append(route.request.url), route.abort()))

    _warm_up(url)
    page.goto(f"{url}/")
    # a fresh server: the templates panel opens by itself, with Kiln's shipped workflows
    page.get_by_text("Image to image", exact=True).click(timeout=60000)
    page.wait_for_function("() => window.app?.graph?.nodes?.some(n => n.type === 'KSampler')", timeout=30000)
    page.evaluate("""() => { const app = window.app, n = app.graph.nodes.find(n => n.type === 'LoadImage');
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [-n.pos[0] + 100, -n.pos[1] + 100];
        app.canvas.setDirty(true, true); }""")
    chooser = None
    for _ in range(5):  # the canvas redraws at its own pace: retry until the button is where it was drawn
        page.wait_for_timeout(600)
        x, y = page.evaluate(UPLOAD_BUTTON)
        try:
            with page.expect_file_chooser(timeout=3000) as chooser_info:
                page.mouse.click(x, y)
            chooser = chooser_info.value
            break
        except Exception:
            continue
    assert chooser is not None, "the LoadImage upload button opened no file chooser"
    # The frontend shows the file's name as soon as the upload starts (its onUploadStart), so the
    # widget's value says nothing about the upload: wait for the server's answer to it instead.
    with page.expect_response(lambda r: "/upload/image" in r.url and r.request.method == "POST",
                              timeout=60000) as answer:
        chooser.set_files(str(server["upload"]))
    assert answer.value.ok and answer.value.json()["name"] == "upload.png", (answer.value.status, answer.value.text())
    page.wait_for_function("() => window.app.graph.nodes.find(n => n.type === 'LoadImage')"
                           ".widgets.find(w => w.name === 'image').value === 'upload.png'", timeout=20000)
    uploaded = folder / "data" / "input" / "upload.png"
    assert uploaded.is_file(), sorted(p.name for p in (folder / "data" / "input").rglob("*"))
    page.evaluate(SHRINK)
    page.get_by_role("button", name="Run").first.click()

    # progress and the result, as the frontend received them
    page.wait_for_function("""() => { const n = window.app.graph.nodes.find(n => n.type === 'SaveImage');
        return !!(n.imgs && n.imgs.length) || !!window.app.nodeOutputs?.[String(n.id)]; }""", timeout=240000)
    messages = [json.loads(f) for f in frames if f.startswith("{")]
    executed = [m["data"] for m in messages if m["type"] == "executed" and m["data"]["node"] == "10"]
    image = executed[-1]["output"]["images"][0]
    job_id = executed[-1]["prompt_id"]
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("prompt_id") == job_id
                and m["data"].get("node") == "8"]
    # 3 steps at AddNoise's strength 0.6 sample the last int(3 * 0.6) = 1 step
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 1, progress[-3:]
    assert (folder / "data" / "output" / image["filename"]).is_file()
    # SaveImage's "executed" message comes before the job is stored as finished, and /history/<id>
    # answers {} until then (as ComfyUI does): read it once the job has ended.
    assert job_finished(url, job_id)["status"] == "succeeded"
    history = json.loads(urllib.request.urlopen(f"{url}/history/{executed[-1]['prompt_id']}").read())
    prompt = history[executed[-1]["prompt_id"]]["prompt"][2]
    assert prompt["4"]["inputs"]["image"] == "upload.png" and prompt["8"]["inputs"]["steps"] == 3

    # the assets panel lists the output (it reads ComfyUI's jobs API)
    page.get_by_role("button", name="Assets (a)").click()
    page.wait_for_selector(f"img[src*='{image['filename']}']", timeout=30000)

    page.get_by_role("button", name="Assets (a)").click()  # closes the panel again

    # the job-history panel (registered only with the docked queue, setting Comfy.Queue.QPOV2, which the
    # frontend stores through Kiln's /api/settings) lists the job with its output's name and thumbnail
    page.evaluate("() => window.app.extensionManager.setting.set('Comfy.Queue.QPOV2', true)")
    stored = json.loads(urllib.request.urlopen(f"{url}/api/settings/Comfy.Queue.QPOV2").read())
    assert stored is True
    page.get_by_role("button", name="Job History").first.click(timeout=20000)
    row = page.locator(f"[data-testid=job-history-sidebar] [data-job-id='{job_id}']")
    row.wait_for(timeout=30000)
    assert image["filename"] in row.inner_text()
    assert image["filename"] in (row.locator("img").first.get_attribute("src") or "")
    page.get_by_role("button", name="Job History").first.click()  # closes the panel again

    # saved in the frontend -> Kiln's library -> Kiln's editor
    # the command the Save menu entry and Ctrl+S run; a template is a new workflow, so it asks for a name
    page.evaluate("() => { window.app.extensionManager.command.execute('Comfy.SaveWorkflow'); }")
    name_box = page.locator("[role=dialog] input").first
    try:
        name_box.wait_for(timeout=10000)
    except Exception:
        page.screenshot(path=str(folder / "save.png"))
        raise
    name_box.fill("from-comfy")
    with page.expect_response(lambda r: "/userdata/" in r.url and r.request.method == "POST",
                              timeout=60000) as answer:  # the server's answer, however busy the machine
        name_box.press("Enter")
    assert answer.value.ok, (answer.value.status, answer.value.text())
    saved = folder / "workflows" / "from-comfy.json"
    assert saved.is_file(), list((folder / "workflows").glob("*"))
    assert isinstance(json.loads(saved.read_text())["nodes"], list)  # ComfyUI's editor format, as saved
    page.get_by_role("button", name="Workflows (w)").click()
    page.get_by_text("from-comfy", exact=False).first.wait_for(timeout=10000)

    assert not outside, outside
    assert not failed, failed
    assert not errors, errors

    kiln = browser.new_page(viewport={"width": 1280, "height": 800})
    kiln_errors: list[str] = []
    kiln.on("pageerror", lambda e: kiln_errors.append(str(e)))
    kiln.goto(f"{url}/kiln/")
    kiln.wait_for_function("() => window.kiln && window.kiln.ready")
    kiln.evaluate("() => window.kiln.ready")
    kiln.evaluate("() => window.kiln.app.files.openFromLibrary('from-comfy.json')")
    graph = kiln.evaluate("() => window.kiln.toKiln()")
    types = {n["type"] for n in graph["nodes"].values()}
    assert {"LoadImage", "KSampler", "SaveImage"} <= types
    loader = next(n for n in graph["nodes"].values() if n["type"] == "LoadImage")
    assert loader["inputs"]["image"] == "upload.png"
    assert not kiln_errors, kiln_errors
