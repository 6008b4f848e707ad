"""The editor as a daily workbench (issue 14), in Chromium against a real Kiln server
with the tiny model: work is never lost, runs queue, results come back from the
server's history, and the result viewer compares. Each new state is saved as a
screenshot under ``test-artifacts/``.
"""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from browser_support import RUN_TIMEOUT_MS, Server, http_json, tiny_img2img

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def run_job(server: Server, workflow: dict[str, Any]) -> dict[str, Any]:
    """Run a workflow through the HTTP API (not the page) and wait for its end."""
    job = http_json(server.url, "POST", "/api/jobs", {"workflow": workflow})
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while (state := http_json(server.url, "GET", f"/api/jobs/{job['job_id']}"))["status"] not in (
            "succeeded", "failed", "cancelled", "interrupted"):
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    return state


def modified(editor) -> bool:
    return editor.page.evaluate("document.querySelector('#doc-name').classList.contains('modified')")


def test_work_survives_a_reload_with_its_undo_history_and_replacing_asks_first(editor, server):
    page = editor.page
    original = editor.doc()
    assert not modified(editor) and not page.title().startswith("\u2022")
    # Two edits: a step up on KSampler, and the prompt retyped.
    editor.node("8").locator('.widget-row[data-input="steps"] .w-step.inc').click()
    editor.node("2").locator("textarea").fill("a foggy harbour")
    editor.node("2").locator("textarea").blur()
    edited = editor.doc()
    assert edited["nodes"]["8"]["inputs"]["steps"] == original["nodes"]["8"]["inputs"]["steps"] + 1
    assert modified(editor) and page.title().startswith("\u2022 img2img.json")
    editor.screenshot("workbench-modified-marker")

    # Leaving the page with unsaved changes asks first (the browser's own dialog).
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.type), d.accept()))
    page.wait_for_timeout(200)  # the autosave is debounced by 150 ms; beforeunload also writes it
    page.reload()
    page.wait_for_function("document.body.classList.contains('ready')", timeout=20_000)
    assert dialogs == ["beforeunload"]
    # The graph is back as it was, still marked modified, and its undo history too.
    assert editor.doc() == edited
    assert modified(editor)
    page.mouse.click(*editor.canvas_point(10, 10))
    page.keyboard.press("Control+z")
    assert editor.doc()["nodes"]["2"]["inputs"]["text"] == original["nodes"]["2"]["inputs"]["text"]
    page.keyboard.press("Control+z")
    assert editor.doc() == original and not modified(editor), "undone back to the file as opened"
    page.keyboard.press("Control+Shift+z")
    page.keyboard.press("Control+Shift+z")
    assert editor.doc() == edited

    # Opening another workflow asks before replacing the edits; Cancel keeps them.
    page.click("#open")
    page.locator('.modal-item[data-value="strong.json"]').click()
    page.locator(".modal.confirm").wait_for(timeout=3000)
    editor.screenshot("workbench-confirm-replace")
    page.click(".modal.confirm .modal-cancel")
    assert editor.doc() == edited
    page.click("#open")
    page.locator('.modal-item[data-value="strong.json"]').click()
    page.click(".modal.confirm .modal-ok")
    page.wait_for_function("document.querySelector('#doc-name').textContent === 'strong.json'")
    assert editor.doc()["title"] == "Strong repaint" and not modified(editor)
    page.keyboard.press("Control+z")  # the replacement is one undo step, its name included
    assert editor.doc() == edited and page.locator("#doc-name").text_content() == "img2img.json"
    assert modified(editor)

    # Saved (to img2img.json, not over strong.json), it is no longer modified and leaving asks nothing.
    page.keyboard.press("Control+s")
    page.wait_for_function("!document.querySelector('#doc-name').classList.contains('modified')")
    try:
        assert json.loads((server.workflows / "img2img.json").read_text())["nodes"] == edited["nodes"]
        assert json.loads((server.workflows / "strong.json").read_text())["title"] == "Strong repaint"
        assert (server.workflows / "img2img.json").stat().st_mode & 0o777 == 0o644
        page.reload()
        page.wait_for_function("document.body.classList.contains('ready')", timeout=20_000)
        assert dialogs == ["beforeunload"], "no second warning: nothing was unsaved"
        assert editor.doc() == edited and page.locator("#doc-name").text_content() == "img2img.json"
    finally:
        (server.workflows / "img2img.json").write_text(json.dumps(tiny_img2img(), indent=1))


def test_runs_queue_and_results_come_back_from_the_history(editor, server):
    page = editor.page
    steps = editor.node("8").locator('.widget-row[data-input="steps"] input')
    seed = editor.node("7").locator('.widget-row[data-input="seed"] input.w-num-input')

    def set_field(field, value):
        field.fill(str(value))
        field.press("Enter")

    # A long first job, then two more queued behind it while it runs.
    set_field(steps, 400)
    set_field(seed, 101)
    page.click("#run")
    page.wait_for_function("window.kiln.nodeEl('8').classList.contains('running')", timeout=RUN_TIMEOUT_MS)
    set_field(steps, 3)
    set_field(seed, 102)
    page.keyboard.press("Control+Enter")
    set_field(seed, 103)
    page.click("#run")
    page.click("#tab-queue")
    page.wait_for_function("document.querySelectorAll('#queue-list .queue-item').length === 3")
    rows = page.locator("#queue-list .queue-item")
    assert [rows.nth(i).get_attribute("class").split()[-1] for i in range(3)] == ["running", "queued", "queued"]
    assert page.locator("#queue-count").text_content() == "3"
    page.wait_for_function("parseFloat(document.querySelector('.queue-item.running .queue-bar-fill').style.width) > 0")
    editor.screenshot("workbench-queue")
    queued = [rows.nth(i).get_attribute("data-job") for i in (1, 2)]
    # Cancel the last one in the panel: the server drops it.
    rows.nth(2).locator(".queue-cancel").click()
    page.wait_for_function("document.querySelectorAll('#queue-list .queue-item').length === 2")
    assert http_json(server.url, "GET", f"/api/jobs/{queued[1]}")["status"] == "cancelled"
    # Stop the running one: the canvas follows the next, which runs to its image.
    page.click("#stop")
    editor.wait_output_image("10")
    editor.wait_idle()
    assert page.evaluate("window.kiln.app.runner.jobId") == queued[0]
    assert http_json(server.url, "GET", f"/api/jobs/{queued[0]}")["status"] == "succeeded"
    page.wait_for_function("document.querySelectorAll('#queue-list .queue-item').length === 0")

    # The results panel lists the finished jobs from the server; after a reload too.
    page.click("#tab-results")
    card = page.locator(f'.result-job[data-job="{queued[0]}"]')
    card.locator("img").wait_for(timeout=5000)
    page.reload()
    page.wait_for_function("document.body.classList.contains('ready')", timeout=20_000)
    card.locator("img").wait_for(timeout=5000)
    page.wait_for_function("[...document.querySelectorAll('#gallery-list img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(".result-job.interrupted").count() >= 1
    editor.screenshot("workbench-results-after-reload")

    # Open that run's graph: the seed it ran with (the graph now holds later edits, so it asks).
    set_field(editor.node("7").locator('.widget-row[data-input="seed"] input.w-num-input'), 555)
    card.locator(".result-open").click()
    page.click(".modal.confirm .modal-ok")
    page.wait_for_function("window.kiln.toKiln().nodes['7'].inputs.seed === 102")
    assert editor.doc()["nodes"]["8"]["inputs"]["steps"] == 3
    # Delete it from the history.
    card.locator(".result-delete").click()
    card.wait_for(state="detached", timeout=5000)
    assert all(j["id"] != queued[0] for j in http_json(server.url, "GET", "/api/history?limit=100")["jobs"])


def test_the_viewer_steps_zooms_and_compares_two_results(editor, server):
    page = editor.page
    for strength in (0.3, 0.9):
        assert run_job(server, tiny_img2img(f"sweep {strength}", strength))["status"] == "succeeded"
    page.reload()
    page.wait_for_function("document.body.classList.contains('ready')", timeout=20_000)
    page.wait_for_function("document.querySelectorAll('#gallery-list img').length >= 2")
    page.locator("#gallery-list img").first.click()
    viewer = page.locator(".viewer")
    viewer.wait_for()
    name = page.locator(".viewer-name")
    first = name.text_content()
    assert first.endswith(f"(1/{page.locator('#gallery-list img').count()})")
    page.keyboard.press("ArrowRight")
    assert "(2/" in name.text_content()
    page.keyboard.press("ArrowLeft")
    assert name.text_content() == first
    # Zoom at the pointer and pan by dragging.
    stage = page.locator(".viewer-stage").bounding_box()
    centre = (stage["x"] + stage["width"] / 2, stage["y"] + stage["height"] / 2)
    page.mouse.move(*centre)
    page.mouse.wheel(0, -100)
    page.mouse.wheel(0, -100)
    transform = page.evaluate("document.querySelector('.viewer-frame').style.transform")
    assert "scale(1.3" in transform, transform
    # A/B: the second image under the first, split by the slider.
    page.click(".viewer-compare")
    a_src = page.evaluate("document.querySelector('.viewer-img').src")
    b_src = page.evaluate("document.querySelector('.viewer-img-b').src")
    assert a_src != b_src and page.locator(".viewer-slider").is_visible()
    page.locator(".viewer-slider").fill("25")
    assert page.evaluate("document.querySelector('.viewer-img').style.clipPath") == "inset(0px 75% 0px 0px)"
    page.wait_for_function("document.querySelector('.viewer-img-b').naturalWidth > 0")
    editor.screenshot("workbench-viewer-ab")
    page.keyboard.press("Escape")
    viewer.wait_for(state="detached")


def test_fixes_from_the_walk(editor, server):
    page = editor.page
    # KSampler's denoise says it does nothing while AddNoise feeds its latent.
    row = editor.node("8").locator('.widget-row[data-input="denoise"]')
    assert row.evaluate("e => e.classList.contains('inactive')")
    assert "AddNoise #7" in row.locator(".row-note").text_content()
    start = editor.socket("8", "in", "latent_image")
    editor.drag(start, (start[0] - 40, start[1] + 300))  # detach the latent: denoise matters again
    assert not row.evaluate("e => e.classList.contains('inactive')") and row.locator(".row-note").text_content() == ""
    page.keyboard.press("Control+z")

    # Export in ComfyUI's API format, next to Kiln's.
    with page.expect_download() as info:
        page.click("#download-api")
    download = info.value
    assert download.suggested_filename == "img2img.api.json"
    api = json.loads(open(download.path()).read())
    doc = editor.doc()
    assert api == {nid: {"class_type": n["type"], "inputs": n["inputs"]} | ({"_meta": {"title": n["title"]}} if "title" in n else {})
                   for nid, n in doc["nodes"].items()}
    assert api["2"]["_meta"] == {"title": "positive prompt"}

    # Run badges belong to their graph: after New, a new node #1 shows none.
    page.click("#run")
    editor.wait_idle()
    page.wait_for_function("document.querySelectorAll('.node.done, .node.cached').length > 0")
    page.click("#new")
    if page.locator(".modal.confirm").count():
        page.click(".modal.confirm .modal-ok")
    node = editor.add_node("ksampler", 300, 200)
    assert node == "1"
    classes = editor.node("1").get_attribute("class").split()
    assert not {"done", "cached", "failed", "running"} & set(classes), classes
    assert editor.node("1").locator(".node-badge").text_content() == ""


def right_click(editor, x: float, y: float) -> None:
    editor.page.mouse.click(x, y, button="right")
    editor.page.locator(".context-menu").wait_for(timeout=3000)


def menu(editor, action: str) -> None:
    editor.page.click(f'.context-menu .menu-item[data-action="{action}"]')


def test_comfyui_habits_space_pan_menus_groups_reroutes_minimap_and_search(editor):
    page = editor.page
    original = editor.doc()
    title = page.evaluate("window.kiln.titlePos('8')")
    # Space held: a drag that starts on a node pans the view; nothing moves, no text gets selected, no search opens.
    offset = page.evaluate("window.kiln.view.offset")
    page.keyboard.down(" ")
    editor.drag(tuple(title), (title[0] - 200, title[1] + 80))
    page.keyboard.up(" ")
    assert page.evaluate("window.kiln.view.offset") == [offset[0] - 200, offset[1] + 80]
    assert editor.doc() == original and not page.locator(".palette").is_visible()
    assert page.evaluate("getSelection().toString()") == ""

    # Right-click a node: bypass AddNoise; what runs skips it and KSampler takes AddNoise's own latent input.
    right_click(editor, *page.evaluate("window.kiln.titlePos('7')"))
    editor.screenshot("habits-node-menu")
    menu(editor, "bypass")
    assert "bypassed" in editor.node("7").get_attribute("class")
    # The page submits the graph with its modes; the server applies them (engine/modes.py, the
    # rule kiln run and /prompt share), seen here through its ComfyUI API conversion.
    sent = page.evaluate("window.kiln.graph.toSubmit()")
    assert sent["nodes"]["7"]["ui"]["mode"] == "bypass"
    run = page.evaluate("window.kiln.app.api.toApiFormat(window.kiln.graph.toSubmit())")
    assert "7" not in run and run["8"]["inputs"]["latent_image"] == original["nodes"]["7"]["inputs"]["latent"]
    assert editor.doc()["nodes"]["7"]["ui"]["mode"] == "bypass"
    # Mute the negative prompt: it does not run and nothing takes its output.
    right_click(editor, *page.evaluate("window.kiln.titlePos('3')"))
    menu(editor, "mute")
    run = page.evaluate("window.kiln.app.api.toApiFormat(window.kiln.graph.toSubmit())")
    assert "3" not in run and "negative" not in run["8"]["inputs"]
    # Colour, collapse and pin.
    right_click(editor, *page.evaluate("window.kiln.titlePos('9')"))
    page.click('.context-menu .swatch[data-color="#3f7a3a"]')
    assert editor.doc()["nodes"]["9"]["ui"]["color"] == "#3f7a3a"
    right_click(editor, *page.evaluate("window.kiln.titlePos('9')"))
    menu(editor, "collapse")
    assert editor.node("9").locator(".node-body").is_hidden()
    assert page.locator('svg.links path.link[data-to="9"]').count() == 2, "its two links still drawn"
    right_click(editor, *page.evaluate("window.kiln.titlePos('10')"))
    menu(editor, "pin")
    pinned = editor.doc()["nodes"]["10"]["ui"]["pos"]
    t10 = page.evaluate("window.kiln.titlePos('10')")
    editor.drag(tuple(t10), (t10[0] + 120, t10[1] + 50))
    assert editor.doc()["nodes"]["10"]["ui"]["pos"] == pinned

    # Groups: Ctrl+G around the two prompts; dragging its title moves them; rename; remove.
    page.mouse.click(*page.evaluate("window.kiln.titlePos('2')"))
    page.keyboard.down("Shift")
    page.mouse.click(*page.evaluate("window.kiln.titlePos('3')"))
    page.keyboard.up("Shift")
    page.keyboard.press("Control+g")
    groups = editor.doc()["groups"]
    assert len(groups) == 1
    before = {i: editor.doc()["nodes"][i]["ui"]["pos"] for i in ("2", "3", "8")}
    gt = page.locator(".group-title").bounding_box()
    editor.drag((gt["x"] + 30, gt["y"] + 10), (gt["x"] + 30 + 60, gt["y"] + 10 + 40))
    after = editor.doc()["nodes"]
    scale = page.evaluate("window.kiln.view.scale")
    for i in ("2", "3"):
        assert after[i]["ui"]["pos"] == [before[i][0] + round(60 / scale), before[i][1] + round(40 / scale)], i
    assert after["8"]["ui"]["pos"] == before["8"], "a node outside the group stays"
    gt = page.locator(".group-title").bounding_box()
    page.mouse.dblclick(gt["x"] + 30, gt["y"] + 10)
    page.locator(".modal-input").fill("Prompts")
    page.keyboard.press("Enter")
    assert editor.doc()["groups"][0]["title"] == "Prompts"
    editor.screenshot("habits-group")
    right_click(editor, gt["x"] + 30, gt["y"] + 10)
    menu(editor, "remove-group")
    assert "groups" not in editor.doc()

    # A reroute point on a link (right-click the link), then delete the link from its menu.
    path = page.locator('svg.links path.link[data-to="5"]')
    mid = page.evaluate("""() => { const p = document.querySelector('svg.links path.link[data-to="5"]');
        const q = p.getPointAtLength(p.getTotalLength() / 2); return window.kiln.view.toClient(q.x, q.y); }""")
    assert path.count() == 1
    right_click(editor, *mid)
    menu(editor, "reroute")
    assert len(editor.doc()["nodes"]["5"]["ui"]["routes"]["image"]) == 1
    right_click(editor, *mid)
    menu(editor, "delete-link")
    assert "image" not in editor.doc()["nodes"]["5"]["inputs"]

    # The minimap moves the view to where it is clicked.
    box = page.locator(".minimap").bounding_box()
    offset = page.evaluate("window.kiln.view.offset")
    page.mouse.click(box["x"] + 20, box["y"] + 20)
    assert page.evaluate("window.kiln.view.offset") != offset

    # Fuzzy search, search by type, and a "nothing found" state.
    page.mouse.click(*editor.canvas_point(30, 30))
    page.keyboard.press("/")
    search = page.locator(".palette-input")
    search.fill("ksmp")
    assert page.locator(".palette-item").first.get_attribute("data-type") == "KSampler"
    search.fill("in:LATENT")
    found = {page.locator(".palette-item").nth(i).get_attribute("data-type") for i in range(page.locator(".palette-item").count())}
    assert {"VAEDecode", "KSampler", "AddNoise"} <= found and "CLIPTextEncode" not in found
    search.fill("zzqqxx")
    assert page.locator(".palette-item").count() == 0 and "Nothing found" in page.locator(".palette-empty").text_content()
    page.keyboard.press("Escape")
    # Node descriptions show as text in tooltips, never as markup.
    text = page.evaluate("import('/web/js/node_view.js').then(m => m.plainText('<b>Fast</b> **sampler**, see [docs](http://x)'))")
    assert text == "Fast sampler, see docs"
