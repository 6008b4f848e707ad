"""Light and dark themes (issue 14, item 7): the editor follows the system's colour
scheme, and every piece of text on the page has a contrast of at least 4.5:1 with
what is behind it (WCAG AA), measured in Chromium on both themes with the starter
workflow, a queue, a toast, the search and a menu open.
"""
from __future__ import annotations

import pytest

from browser_support import launch_browser, open_editor

pytestmark = [pytest.mark.browser, pytest.mark.slow]
MODEL_JOBS = False  # no model job runs here: its servers skip the model libraries' warm-up (conftest.server)

#: [text, ratio, colour, background] for every visible text below 4.5:1. Colours are
#: the computed ones; a translucent background or opacity is blended over what is
#: under it, up the ancestors. Disabled controls are exempt (WCAG's inactive parts).
LOW_CONTRAST = """() => {
  const parse = (c) => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return [0, 0, 0, 0];
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number); return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const over = (top, under) => { const a = top[3]; return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a)).concat([1]); };
  const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const backdrop = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) layers.push(parse(getComputedStyle(e).backgroundColor));
    let bg = [255, 255, 255, 1];
    for (const l of layers.reverse()) bg = over(l, bg);
    return bg;
  };
  const opacity = (el) => { let o = 1; for (let e = el; e; e = e.parentElement) o *= Number(getComputedStyle(e).opacity); return o; };
  const out = [];
  const seen = new Set();
  const check = (el, text) => {
    if (!text || seen.has(el)) return;
    seen.add(el);
    if (el.closest(':disabled, [aria-disabled="true"]')) return;
    const r = el.getBoundingClientRect(), st = getComputedStyle(el);
    if (!r.width || !r.height || st.visibility === 'hidden' || r.right < 0 || r.bottom < 0 || r.left > innerWidth || r.top > innerHeight) return;
    const bg = backdrop(el);
    const fg = over([...parse(st.color).slice(0, 3), parse(st.color)[3] * opacity(el)], bg);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    if (ratio < 4.5) out.push([text.slice(0, 40), Math.round(ratio * 100) / 100, st.color, `rgb(${bg.slice(0, 3).map(Math.round)})`, el.className]);
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) if (n.textContent.trim()) check(n.parentElement, n.textContent.trim());
  for (const f of document.querySelectorAll('input:not([type=range]):not([type=file]), textarea, select')) check(f, f.value || '');
  return out;
}"""


@pytest.fixture(scope="module")
def browser():
    yield from launch_browser()


@pytest.mark.parametrize("scheme", ["dark", "light"])
def test_every_text_has_4_5_to_1_contrast(browser, server, scheme):
    editor = open_editor(browser, server, color_scheme=scheme)
    page = editor.page
    try:
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == {"dark": "rgb(29, 31, 35)", "light": "rgb(238, 240, 243)"}[scheme]
        assert page.evaluate(LOW_CONTRAST) == []
        editor.screenshot(f"theme-{scheme}")
        # A node's menu, the search with a match highlighted, a toast, the queue tab.
        page.mouse.click(*page.evaluate("window.kiln.titlePos('7')"), button="right")
        page.locator(".context-menu").wait_for()
        assert page.evaluate(LOW_CONTRAST) == []
        page.keyboard.press("Escape")
        page.mouse.click(*editor.canvas_point(20, 20))
        page.keyboard.press("/")
        page.locator(".palette-input").fill("sampler")
        page.evaluate("window.kiln.app.toast('a toast', 'warn'); window.kiln.app.toast('an error', 'error')")
        assert page.evaluate(LOW_CONTRAST) == []
        editor.screenshot(f"theme-{scheme}-search")
        page.keyboard.press("Escape")
        page.click("#tab-queue")
        assert page.evaluate(LOW_CONTRAST) == []
    finally:
        editor.close_checked()
