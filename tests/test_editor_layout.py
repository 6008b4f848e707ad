"""The editor's layout (issue 14, item 2), in Chromium against a real Kiln server
with the repository's own workflows: the shipped graphs open with no two nodes
touching and no link passing under a node, Tidy up lays out any graph that way,
the opening zoom keeps text readable, and the page works from a phone to 4K.
"""
from __future__ import annotations

import json

import pytest

from browser_support import REPO, Server, drop_file, open_editor

pytestmark = [pytest.mark.browser, pytest.mark.slow]
MODEL_JOBS = False  # no model job runs here: its servers skip the model libraries' warm-up (conftest.server)

SHIPPED = sorted(p.name for p in (REPO / "workflows").glob("*.json"))

#: Every pair of nodes closer than 8 px, and every drawn link that passes under a
#: node other than its two ends (sampled along the SVG path the canvas drew).
PROBLEMS = """() => {
  const v = window.kiln.view, g = window.kiln.graph;
  const rects = [...v.views].map(([id, nv]) => { const n = g.node(id); return [id, n.pos[0], n.pos[1], nv.el.offsetWidth, nv.el.offsetHeight]; });
  const out = [];
  for (let i = 0; i < rects.length; i++) for (let j = i + 1; j < rects.length; j++) {
    const [a, ax, ay, aw, ah] = rects[i], [b, bx, by, bw, bh] = rects[j];
    if (ax < bx + bw + 8 && bx < ax + aw + 8 && ay < by + bh + 8 && by < ay + ah + 8) out.push(`#${a} touches #${b}`);
  }
  for (const p of document.querySelectorAll('svg.links path.link:not(.dragging)')) {
    const len = p.getTotalLength();
    for (let k = 1; k < 80; k++) {
      const q = p.getPointAtLength(len * k / 80);
      const under = rects.find(([id, x, y, w, h]) => id !== p.dataset.from && id !== p.dataset.to
        && q.x > x && q.x < x + w && q.y > y && q.y < y + h);
      if (under) { out.push(`link #${p.dataset.from} -> #${p.dataset.to}.${p.dataset.input} under #${under[0]}`); break; }
    }
  }
  return out;
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A models folder of its own, as tests/relayout_workflows.py lays the workflows out with: the
    session-wide one gains LoRAs and other files from whichever tests ran first, which changes how
    loader widgets are drawn (a substitution notice or not) and so the nodes' sizes."""
    import tiny_models

    workflows = {name: (REPO / "workflows" / name).read_text() for name in SHIPPED}
    models = tiny_models.make_models_folder(tmp_path_factory.mktemp("layout-models"))
    srv = Server(tmp_path_factory.mktemp("layout"), models, workflows, warm_up=MODEL_JOBS)
    yield srv
    srv.stop()


def open_from_library(editor, name: str) -> None:
    page = editor.page
    page.click("#open")
    page.locator(f'.modal-item[data-value="{name}"]').click()
    page.wait_for_function("name => document.querySelector('#doc-name').textContent === name", arg=name)
    editor.drawn()  # links are redrawn on the next frame


def test_shipped_workflows_have_no_overlaps_and_no_hidden_links(editor):
    assert len(SHIPPED) >= 4
    for name in SHIPPED:
        open_from_library(editor, name)
        assert editor.page.evaluate(PROBLEMS) == [], name
        editor.screenshot(f"layout-{name[:-5]}")


def test_tidy_up_lays_out_a_graph_whose_nodes_are_piled_up(editor):
    page = editor.page
    doc = json.loads((REPO / "workflows" / "strength-sweep.json").read_text())
    for node in doc["nodes"].values():
        node["ui"]["pos"] = [100, 100]
    drop_file(editor, json.dumps(doc).encode(), "piled.json", "application/json")
    page.wait_for_function(f"Object.keys(window.kiln.toKiln().nodes).length === {len(doc['nodes'])}")
    assert len(page.evaluate(PROBLEMS)) > 20
    page.click("#tidy")
    assert page.evaluate(PROBLEMS) == []
    tidied = editor.doc()
    assert {n["ui"]["pos"][0] for n in tidied["nodes"].values()} != {100}
    editor.screenshot("layout-tidied")
    page.keyboard.press("Control+z")  # one undo step
    assert {tuple(n["ui"]["pos"]) for n in editor.doc()["nodes"].values()} == {(100, 100)}


def visible_in_viewport(page, selector: str) -> bool:
    return page.evaluate("""sel => { const e = document.querySelector(sel); if (!e) return false;
        const r = e.getBoundingClientRect(), s = getComputedStyle(e);
        return s.display !== 'none' && s.visibility !== 'hidden' && r.width > 0 && r.height > 0
            && r.left >= 0 && r.top >= 0 && r.right <= innerWidth && r.bottom <= innerHeight; }""", selector)


def label_px(page) -> float:
    """The on-screen size of node titles' text at the current zoom."""
    return page.evaluate("parseFloat(getComputedStyle(document.querySelector('.node-label')).fontSize) * window.kiln.view.scale")


def test_text_is_readable_at_the_opening_zoom(browser, server):
    editor = open_editor(browser, server, viewport={"width": 1280, "height": 800})
    assert editor.page.evaluate("window.kiln.view.scale") >= 0.8
    assert label_px(editor.page) >= 10
    # Steppers are big enough to hit: 22 px in the world, at least 17.5 px on screen.
    box = editor.node("8").locator(".w-step.inc").first.bounding_box()
    assert box["width"] >= 17.5 and box["height"] >= 17.5, box
    editor.close_checked()


def test_a_phone_gets_a_menu_a_drawer_and_run_in_reach(browser, server):
    editor = open_editor(browser, server, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    page = editor.page
    try:
        assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
        for sel in ("#run", "#stop", "#menu-toggle", "#sidebar-toggle"):
            assert visible_in_viewport(page, sel), sel
        assert not visible_in_viewport(page, "#open") and not visible_in_viewport(page, "#gallery-list")
        assert label_px(page) >= 10
        editor.screenshot("layout-phone")
        page.click("#menu-toggle")
        assert visible_in_viewport(page, "#open") and visible_in_viewport(page, "#tidy")
        editor.screenshot("layout-phone-menu")
        page.click("#fit")  # a choice closes the menu
        assert not visible_in_viewport(page, "#open")
        page.click("#sidebar-toggle")
        page.wait_for_function("getComputedStyle(document.querySelector('#sidebar')).transform === 'none'")
        assert visible_in_viewport(page, "#tab-queue")
        editor.screenshot("layout-phone-drawer")
        assert visible_in_viewport(page, "#run")
    finally:
        editor.close_checked()


def test_4k_shows_the_whole_toolbar_and_graph(browser, server):
    editor = open_editor(browser, server, viewport={"width": 3840, "height": 2160})
    page = editor.page
    try:
        assert not visible_in_viewport(page, "#menu-toggle")
        for sel in ("#new", "#open", "#save", "#download-api", "#tidy", "#run", "#gallery-list"):
            assert visible_in_viewport(page, sel), sel
        outside = page.evaluate("""() => { const c = document.querySelector('#canvas').getBoundingClientRect();
            return [...document.querySelectorAll('.node')].filter(e => { const r = e.getBoundingClientRect();
              return r.left < c.left || r.top < c.top || r.right > c.right || r.bottom > c.bottom; }).length; }""")
        assert outside == 0
        editor.screenshot("layout-4k")
    finally:
        editor.close_checked()
