"""Editor benchmark: page to interactive canvas, Run to first progress, bytes transferred.

    PYTHONPATH=. .venv/bin/python bench/editor_bench.py [--loads 5] [--runs 3]

Starts a fresh ``kiln serve`` (tiny random-weight SD1 model, the tests' img2img
shrunk to 64 px and 3 steps) and drives Debian's Chromium through Playwright,
as the browser tests do. Reported, as medians:

* page to interactive: navigation start to the editor's ``kiln-interactive``
  performance mark (node definitions loaded, the starter graph drawn), each load
  in a fresh browser context (cold HTTP cache) and once more warm;
* the bytes the page transferred (navigation and every resource, as the
  Resource Timing API reports them), cold and warm;
* Run to first progress: the click on Run to the first ``progress`` event on the
  page's websocket, for the first run on the fresh server (the model loads) and
  for later runs with a new seed (the model is loaded, the sampler re-runs);
  their ratio says how much of the first wait is loading.

A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import tiny_models  # noqa: E402
from browser_support import Server, launch_browser  # noqa: E402

LOAD_STATS = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource');
  return { interactive: performance.getEntriesByName('kiln-interactive')[0].startTime,
           bytes: nav.transferSize + res.reduce((a, r) => a + (r.transferSize || 0), 0),
           files: 1 + res.length };
}"""

WATCH_RUN = """() => { window.__benchFirst = new Promise((resolve) => {
  const app = window.kiln.app;
  let clicked = null;
  document.querySelector('#run').addEventListener('click', () => { clicked = performance.now(); }, { capture: true, once: true });
  const on = (e) => { if (e.detail.type === 'progress' && clicked !== null) {
    app.socket.removeEventListener('event', on); resolve(performance.now() - clicked); } };
  app.socket.addEventListener('event', on);
}); }"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = tiny_models.make_models_folder(root / "models")
        server = Server(root / "srv", models)
        try:
            for browser in launch_browser():
                cold, warm = [], []
                for _ in range(args.loads):
                    context = browser.new_context(viewport={"width": 1280, "height": 800})
                    page = context.new_page()
                    page.goto(server.url + "/")
                    page.wait_for_function("performance.getEntriesByName('kiln-interactive').length > 0", timeout=60_000)
                    cold.append(page.evaluate(LOAD_STATS))
                    page.reload()
                    page.wait_for_function("performance.getEntriesByName('kiln-interactive').length > 0", timeout=60_000)
                    warm.append(page.evaluate(LOAD_STATS))
                    context.close()

                context = browser.new_context(viewport={"width": 1280, "height": 800})
                page = context.new_page()
                page.goto(server.url + "/")
                page.wait_for_function("performance.getEntriesByName('kiln-interactive').length > 0", timeout=60_000)
                firsts = []
                for i in range(args.runs + 1):
                    seed = page.locator('.node[data-id="7"] .widget-row[data-input="seed"] input.w-num-input')
                    seed.fill(str(1000 + i))
                    seed.press("Enter")
                    page.evaluate(WATCH_RUN)
                    page.click("#run")
                    firsts.append(page.evaluate("window.__benchFirst"))
                    page.wait_for_function("!document.body.classList.contains('busy')", timeout=120_000)
                context.close()
        finally:
            server.stop()

    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"page to interactive, cold cache: {med([c['interactive'] for c in cold]):7.0f} ms  "
          f"({med([c['bytes'] for c in cold]) / 1024:.0f} KiB in {cold[0]['files']} files)")
    print(f"page to interactive, warm cache: {med([w['interactive'] for w in warm]):7.0f} ms  "
          f"({med([w['bytes'] for w in warm]) / 1024:.0f} KiB transferred)")
    first, later = firsts[0], med(firsts[1:])
    print(f"Run to first progress, first run (model loads): {first:7.0f} ms")
    print(f"Run to first progress, later runs (new seed):   {later:7.0f} ms   first / later = {first / later:.1f}")


if __name__ == "__main__":
    main()
