"""Start-up work: what `kiln run` imports, and model loads started before the nodes that need them.

An image workflow needs torch (IMAGE is a torch tensor, as in ComfyUI, so custom
nodes keep working) but never diffusers, transformers or accelerate; a model
loader's prefetch hook starts its load in the background as soon as the job is
planned, and the node then finds the model loaded instead of loading it again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from PIL import Image

from engine import types as T
from engine.context import Environment, Paths
from engine.executor import Executor
from engine.helper_threads import owner
from engine.node import Input, Output, define_node
from engine.registry import Registry
from engine.workflow import parse

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from engine.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("diffusers", "transformers", "accelerate", "safetensors",
                           "scipy", "torchsde") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


def test_image_only_run_imports_no_model_library(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(tmp_path / "input" / "a.png")
    (tmp_path / "wf.json").write_text(json.dumps({"version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}}}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", PROBE, "run", "wf.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "output" / "inv_00001_.png").exists()
    assert "HEAVY=\n" in proc.stdout, proc.stdout


def test_prefetch_starts_before_the_first_node(tmp_path: Path) -> None:
    """The first node waits for the later node's prefetch: it can only finish if prefetch started first."""
    started = threading.Event()
    seen: dict[str, object] = {}

    def prefetch(env, inputs) -> None:
        seen["inputs"] = dict(inputs)
        seen["thread"] = threading.current_thread().name
        seen["owner"] = owner()
        started.set()

    @define_node("WaitForPrefetch", inputs=[Input("value", T.INT, default=1)], outputs=[Output("value", T.INT)])
    def wait(ctx, value):
        assert started.wait(10), "the prefetch hook did not start while the first node ran"
        return (value,)

    @define_node("Prefetched", inputs=[Input("value", T.INT), Input("name", T.STRING, default="m.safetensors")],
                 outputs=[Output("value", T.INT)], output_node=True, prefetch=prefetch)
    def prefetched(ctx, value, name):
        return (value + 1,)

    registry = Registry()
    registry.add(wait)
    registry.add(prefetched)
    wf = parse({"version": 1, "nodes": {
        "1": {"type": "WaitForPrefetch", "inputs": {"value": 4}},
        "2": {"type": "Prefetched", "inputs": {"value": ["1", 0], "name": "x.safetensors"}}}})
    outcome = Executor(registry, Environment(paths=Paths.under(tmp_path))).run(wf)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.results["2"] == (5,)
    assert seen["inputs"] == {"name": "x.safetensors"}
    assert str(seen["thread"]).startswith("kiln-prefetch-")
    assert seen["owner"] is threading.current_thread()  # it works for the job's thread (engine/helper_threads.py)


def test_no_prefetch_for_cached_nodes(tmp_path: Path) -> None:
    calls: list[int] = []

    @define_node("Loads", inputs=[Input("value", T.INT, default=1)], outputs=[Output("value", T.INT)],
                 output_node=True, prefetch=lambda env, inputs: calls.append(inputs["value"]))
    def loads(ctx, value):
        return (value,)

    registry = Registry()
    registry.add(loads)
    wf = parse({"version": 1, "nodes": {"1": {"type": "Loads", "inputs": {"value": 3}}}})
    executor = Executor(registry, Environment(paths=Paths.under(tmp_path)))
    executor.run(wf)
    executor.run(wf)  # served from the cache: nothing to prepare
    for _ in range(100):
        if calls:
            break
        threading.Event().wait(0.01)
    assert calls == [3]


def test_checkpoint_prefetch_loads_once_for_the_node(tiny_env) -> None:
    """The loader's hook and its run share one key: the node finds the prefetched model, no second load."""
    from engine.registry import default_registry

    spec = default_registry().get("CheckpointLoader")
    spec.prefetch(tiny_env, {"ckpt_name": "tiny-sd1.safetensors"})
    assert tiny_env.models.counters["loads"] == 1
    wf = parse({"version": 1, "nodes": {
        "1": {"type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}}}})
    outcome = Executor(default_registry(), tiny_env).run(wf, outputs=["1"])
    assert outcome.status == "succeeded", outcome.error
    assert tiny_env.models.counters["loads"] == 1
    assert tiny_env.models.counters["hits"] >= 1
