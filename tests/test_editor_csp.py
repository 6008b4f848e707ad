"""The editor page's security headers, and the editor working under its Content-Security-Policy.

The headers are checked on a real server; then Debian's Chromium opens the page
from a real Kiln server, records every CSP violation the page reports
(``securitypolicyviolation`` events and console errors), adds a node, runs a
tiny img2img job from the library whose previews and result image are shown.
"""
from __future__ import annotations

import time
from typing import Any

import pytest

from browser_support import VIEWPORT, Server, launch_browser
from server_helpers import kiln  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.browser]


async def test_the_editor_page_and_its_files_send_the_security_headers(kiln):  # noqa: F811
    for path in ("/", "/web/js/main.js", "/web/css/editor.css"):
        r = await kiln.get(path)
        assert r.status == 200, path
        csp = r.headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp, path
        assert r.headers.get("X-Frame-Options") == "DENY", path
        assert r.headers.get("X-Content-Type-Options") == "nosniff", path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models_dir):
    srv = Server(tmp_path_factory.mktemp("csp"), tiny_models_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    yield from launch_browser()


def wait_until(page: Any, expression: str, timeout_s: float = 60.0) -> None:
    """Poll ``expression`` with page.evaluate. Playwright's wait_for_function compiles its
    predicate with ``new Function`` inside the page, which this very policy forbids."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        time.sleep(0.1)


WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation',
  e => window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def test_the_editor_loads_and_runs_under_its_policy_without_violations(browser, server):
    page = browser.new_page(viewport=VIEWPORT)
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    page.add_init_script(WATCH_CSP)
    try:
        response = page.goto(server.url + "/")
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        wait_until(page, "document.body.classList.contains('ready')", 20)
        assert page.locator(".node").count() > 0  # the modules ran and drew the starter workflow
        # the library, the run (websocket, sampler previews as blob: images) and the result image
        page.click("#open")
        page.locator('.modal-item[data-value="strong.json"]').click()
        wait_until(page, "document.querySelector('#doc-name').textContent === 'strong.json'", 20)
        page.keyboard.press("Control+Enter")
        wait_until(page, """(() => { const img = document.querySelector('.node[data-id="10"] .node-media img.output');
                                   return !!img && img.complete && img.naturalWidth > 0; })()""", 90)
        wait_until(page, "!document.querySelector('#run').disabled", 90)
        assert "succeeded" in page.locator("#status").text_content()
        violations: list[Any] = page.evaluate("window.__cspViolations")
        assert violations == []
        assert [m for m in console if "Content Security Policy" in m or "Refused to" in m] == []
        assert [m for m in console if "page error" in m] == []
    finally:
        page.close()
