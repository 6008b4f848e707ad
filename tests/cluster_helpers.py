"""A real Dask cluster on loopback for the cluster tests: a scheduler process and Kiln worker processes.

Run as a script it is one ``kiln worker`` with the test registry (the stub nodes
of server_helpers plus the real node library):

    python tests/cluster_helpers.py SCHEDULER NAME DATA_DIR MODELS_DIR [VERSION]

VERSION pretends to be another Kiln version (the refusal test).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from engine.registry import Registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_registry() -> Registry:
    """Stub nodes (Spin, StubSaveText, ...), Crash, and the real node library, in one registry."""
    import nodes
    import server_helpers
    from engine import types as T
    from engine.node import Input, Output, define_node

    @define_node("Crash", category="test", inputs=[Input("value", T.FLOAT)], outputs=[Output("value", T.FLOAT)])
    def crash(ctx, value):
        """Kills its own process at once, as a native fault or the OOM killer would."""
        os.kill(os.getpid(), signal.SIGKILL)

    registry = server_helpers.make_registry()
    registry.add(crash)
    nodes.register(registry)
    return registry


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate, then kill; always reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class Cluster:
    """A scheduler and named workers, all on 127.0.0.1 on ports the OS picks."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.scheduler: subprocess.Popen | None = None
        self.address = ""
        self.workers: dict[str, subprocess.Popen] = {}

    def start_scheduler(self, timeout: float = 30, port: int = 0) -> str:
        info = self.base / f"scheduler-{time.monotonic_ns()}.json"
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=self.base)
        deadline = time.monotonic() + timeout
        while not info.exists():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the Dask scheduler did not start")
            time.sleep(0.05)
        while True:
            try:
                self.address = json.loads(info.read_text())["address"]
                return self.address
            except (json.JSONDecodeError, KeyError):
                time.sleep(0.05)

    def start_worker(self, name: str, models: Path, version: str | None = None) -> subprocess.Popen:
        args = [sys.executable, str(Path(__file__).resolve()), self.address, name, str(self.base / "workers"),
                str(models)]
        if version:
            args.append(version)
        log = open(self.base / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=self.base)
        log.close()
        self.workers[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        proc = self.workers.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            stop(self.scheduler)
            self.scheduler = None

    def stop_worker(self, name: str) -> None:
        stop(self.workers.pop(name))

    def close(self) -> None:
        # Every worker is asked to stop first and then reaped, so their shutdowns overlap
        # instead of adding up (each takes a second or two to close its Dask connections).
        workers = [self.workers.pop(name) for name in list(self.workers)]
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in workers:
            stop(proc)  # already terminated: waits, and kills one that does not exit in time
        if self.scheduler is not None:
            stop(self.scheduler)
            self.scheduler = None


async def wait_for(predicate: Any, timeout: float = 60, what: str = "a condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    from engine.server import cluster_worker

    scheduler, name, data, models = sys.argv[1:5]
    version = sys.argv[5] if len(sys.argv) > 5 else cluster_worker.__version__
    try:
        asyncio.run(cluster_worker.serve(scheduler, make_registry(), ["cpu"], data, models, name=name,
                                         timeout=5, version=version))
    except (OSError, cluster_worker.VersionRefused) as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
