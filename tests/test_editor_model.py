"""The editor's graph-model modules, unit-tested without a server.

The cases live in tests/js/graph_model_cases.mjs and run in Chromium, the modules
imported into a page as the editor imports them. Where Node is installed the same
cases also run without a browser: ``node --test tests/js/``.
"""
from __future__ import annotations

import pytest

from browser_support import VIEWPORT, launch_browser, serve_repo

pytestmark = pytest.mark.browser

RUN_CASES = """async () => {
  const m = await import('/tests/js/graph_model_cases.mjs');
  const out = [];
  for (const [name, fn] of m.cases) {
    try { await fn(); out.push([name, null]); }
    catch (e) { out.push([name, String((e && e.stack) || e)]); }
  }
  return out;
}"""


@pytest.fixture(scope="module")
def browser():
    yield from launch_browser()


def test_graph_model_cases_pass_in_chromium(browser):
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    serve_repo(page)
    page.goto("http://kiln.test/")
    results = page.evaluate(RUN_CASES)
    failures = [f"{name}: {err}" for name, err in results if err]
    assert len(results) >= 16, results
    assert not failures, "\n\n".join(failures)
    assert not errors, errors
