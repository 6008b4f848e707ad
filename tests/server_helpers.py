"""Server test helpers: extra stub nodes, an app fixture factory, job polling, a subprocess server.

Run as a script it serves the stub registry with ``run_server`` (a real process
for the ``kill -9`` test):  python tests/server_helpers.py PORT DATA_DIR
"""
from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from engine import types as T  # noqa: E402
from engine.events import Preview  # noqa: E402
from engine.node import Input, Output, Result, define_node  # noqa: E402
from engine.registry import Registry  # noqa: E402

import stub_nodes  # noqa: E402


def _tiny_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


@define_node("Spin", category="test", inputs=[Input("value", T.FLOAT), Input("ticks", T.INT, default=100, min=1,
                                                                               max=100000),
                                              Input("preview", T.BOOLEAN, default=False),
                                              Input("delay", T.FLOAT, default=0.0, min=0, max=10)],
             outputs=[Output("value", T.FLOAT)])
def spin(ctx, value, ticks, preview, delay):
    """Ticks progress as fast as it can (a fast sampler), optionally with a JPEG preview."""
    jpeg = Preview(_tiny_jpeg(), "image/jpeg", 8, 8) if preview else None
    for i in range(ticks):
        ctx.progress(i + 1, ticks, preview=jpeg)
        if delay:
            time.sleep(delay)
    return (value,)


@define_node("StubSaveText", category="test", output_node=True,
             inputs=[Input("text", T.STRING), Input("prefix", T.STRING, default="out")])
def save_text(ctx, text, prefix):
    """Writes a file into the output folder, like SaveImage, so durability tests can check files."""
    name = f"{prefix}_{ctx.job.id}.txt"
    ctx.env.paths.output.resolve(name).write_text(text)
    return Result(ui={"files": [{"filename": name, "subfolder": "", "type": "output"}], "text": [text]})


def make_registry() -> Registry:
    registry = stub_nodes.make_registry()
    registry.add(spin)
    registry.add(save_text)
    # The node library's model manager, as nodes.register provides it to a real server.
    from nodes.runtime.models import ModelManager

    registry.model_host_factory = lambda device=None: ModelManager(device=device)
    from nodes import model_folders

    registry.model_folders = model_folders.FOLDERS
    return registry


# -- workflows --------------------------------------------------------------------------------

def show_workflow(value: float = 2.0) -> dict[str, Any]:
    """Number -> Format -> Show, with a named parameter "value"."""
    return {"version": 1, "params": {"value": "1.value"},
            "nodes": {"1": {"type": "Number", "inputs": {"value": value}},
                      "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
                      "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}


def slow_workflow(value: float = 1.0, ticks: int = 2000, delay: float = 0.01) -> dict[str, Any]:
    """A job that runs for ticks*delay seconds unless interrupted."""
    return {"version": 1, "nodes": {
        "1": {"type": "Spin", "inputs": {"value": value, "ticks": ticks, "delay": delay}},
        "2": {"type": "Format", "inputs": {"value": ["1", 0]}},
        "3": {"type": "Show", "inputs": {"text": ["2", 0]}}}}


def save_workflow(text: str, prefix: str = "out") -> dict[str, Any]:
    return {"version": 1, "nodes": {"1": {"type": "StubSaveText", "inputs": {"text": text, "prefix": prefix}}}}


# -- polling ----------------------------------------------------------------------------------

async def wait_status(client: Any, job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "interrupted",
                                                                            "cancelled"),
                      timeout: float = 20.0, base: str = "") -> dict[str, Any]:
    """Poll GET /api/jobs/{id} until its status is one of ``statuses``.

    ``client`` is aiohttp's test client (paths only) or a ``ClientSession`` with the
    server's ``base`` URL (a subprocess server).
    """
    deadline = time.monotonic() + timeout
    while True:
        async with client.get(f"{base}/api/jobs/{job_id}") as r:
            assert r.status == 200, await r.text()
            job = await r.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def kiln(aiohttp_client: Any, tmp_path: Path) -> Any:
    """A real server on a free loopback port: stub nodes, a SQLite file under tmp_path."""
    from engine.server.app import make_app

    app = make_app(tmp_path / "data", tmp_path / "models", tmp_path / "workflows", registry=make_registry())
    return await aiohttp_client(app)


async def wait_up(session: Any, base: str, proc: subprocess.Popen, timeout: float = 20) -> float:
    """Seconds until a subprocess server answers GET /prompt; fails early if it exits."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read().decode() if proc.stdout else proc.returncode}")
        try:
            async with session.get(f"{base}/prompt") as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError("server did not come up")


def kiln_command() -> list[str]:
    """``kiln`` as a shell starts it: the installed console script, else the module."""
    script = Path(sys.executable).parent / "kiln"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    from engine.server.app import run_server

    run_server("127.0.0.1", int(sys.argv[1]), data_dir=sys.argv[2], models_dir=Path(sys.argv[2]) / "models",
               workflows_dir=Path(sys.argv[2]) / "workflows", registry=make_registry())
