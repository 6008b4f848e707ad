"""Lay out the shipped workflows with the editor's own Tidy up, and write the positions
and link routes back into ``workflows/*.json`` (nothing else in the files changes).

    PYTHONPATH=. python tests/relayout_workflows.py

It starts a real ``kiln serve`` with the tiny test model (so a checkpoint the server
lacks is noted on its node, the tallest that node gets) and drives Chromium, as the
browser tests do. tests/test_editor_layout.py checks the result.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from browser_support import REPO, Server, launch_browser, open_editor  # noqa: E402
import tiny_models  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = tiny_models.make_models_folder(root / "models")
        names = sorted(p.name for p in (REPO / "workflows").glob("*.json"))
        server = Server(root / "srv", models, {n: (REPO / "workflows" / n).read_text() for n in names})
        try:
            for browser in launch_browser():
                editor = open_editor(browser, server)
                page = editor.page
                for name in names:
                    page.click("#open")
                    page.locator(f'.modal-item[data-value="{name}"]').click()
                    page.wait_for_timeout(300)
                    if page.locator(".modal.confirm").count():  # the last one, tidied, is unsaved
                        page.click(".modal.confirm .modal-ok")
                    page.wait_for_function("n => document.querySelector('#doc-name').textContent === n", arg=name)
                    page.click("#tidy")
                    laid = page.evaluate("window.kiln.toKiln()")["nodes"]
                    path = REPO / "workflows" / name
                    doc = json.loads(path.read_text())
                    for node_id, node in doc["nodes"].items():
                        ui = laid[node_id]["ui"]
                        node.setdefault("ui", {})["pos"] = ui["pos"]
                        if ui.get("routes"):
                            node["ui"]["routes"] = ui["routes"]
                        else:
                            node["ui"].pop("routes", None)
                    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
                    print(f"laid out {name}")
                page.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
