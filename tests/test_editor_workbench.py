"""The editor as a daily workbench (issue 14), in Chromium against a real ``kiln serve``
with the tiny model: work is never lost, runs queue, results come back from the
server's history, and the result viewer compares. Each new state is saved as a
screenshot under ``test-artifacts/``.
"""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from browser_support import RUN_TIMEOUT_MS, Server, http_json, launch_browser, open_editor, tiny_img2img

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models_dir):
    srv = Server(tmp_path_factory.mktemp("workbench"), tiny_models_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    yield from launch_browser()


@pytest.fixture
def editor(browser, server):
    ed = open_editor(browser, server)
    yield ed
    ed.close_checked()


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
