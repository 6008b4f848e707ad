"""The layering the README states: engine/ imports neither nodes/, torch nor diffusers.

Checked on the source (every import statement, also the ones inside functions), so
a lazy import cannot slip through the way a runtime ``sys.modules`` check would miss it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"
FORBIDDEN = ("nodes", "torch", "diffusers", "transformers", "safetensors", "accelerate")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def test_engine_imports_no_node_library_torch_or_diffusers():
    offending = [f"{path.relative_to(ENGINE.parent)}:{line} imports {name}"
                 for path in sorted(ENGINE.rglob("*.py"))
                 for line, name in imported_modules(path)
                 if name.split(".")[0] in FORBIDDEN]
    assert offending == []


def test_the_checker_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import torch.nn\n    from nodes.runtime import models\n")
    assert [name for _, name in imported_modules(probe)] == ["torch.nn", "nodes.runtime"]
