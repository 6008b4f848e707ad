"""Cluster throughput: N tiny-model img2img jobs in-process, on 1 and on 2 Dask workers, side by side.

    .venv/bin/python bench/cluster_throughput.py [--jobs 12] [--steps 8] [--light 30]

Everything runs on this machine on loopback: a Dask scheduler process, two
``kiln worker`` processes (one thread each, OMP_NUM_THREADS=1) and Kiln servers
built with ``make_app`` in this process (the in-process one with one lane, also
one thread). Each mode is warmed first (torch imported, the checkpoint loaded on
every worker), then N jobs differing only in their seed are submitted at once and
timed from the first submission to the last finished job. Reported: seconds,
jobs per second, each mode against the in-process worker, and the scaling of 2
workers over 1 (the target is >= 0.9 x 2 on a machine with a core per worker).

Scheduling overhead: ``--light`` jobs that do almost nothing (a 32 px
LoadImage -> SaveImage), one at a time, on the in-process worker and on one
cluster worker; the difference of the mean round trips is what the cluster adds
per job (claim, Dask task, event topic, files back). A benchmark: nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def img2img(seed: int, steps: int, ckpt: str) -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "1": {"type": "CheckpointLoader", "inputs": {"ckpt_name": ckpt}},
        "2": {"type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"type": "LoadImage", "inputs": {"image": "bench.png"}},
        "5": {"type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                                             "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                             "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0]}},
        "7": {"type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "bench"}}}}


def light() -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "small.png"}},
        "2": {"type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "light"}}}}


class Processes:
    def __init__(self, base: Path) -> None:
        self.base, self.procs, self.address = base, [], ""

    def scheduler(self) -> str:
        info = self.base / "scheduler.json"
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.base))
        import json

        while True:
            try:
                self.address = json.loads(info.read_text())["address"]
                return self.address
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.05)

    def worker(self, name: str, models: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_VERBOSITY="error")
        log = open(self.base / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "worker", self.address, "--name", name, "--devices", "cpu",
             "--models", str(models), "--data", str(self.base / "workers")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        log.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def run_jobs(client: Any, workflows: list[dict[str, Any]], at_once: bool = True) -> tuple[float, list[dict]]:
    """Submit (all at once, or one after another) and wait; returns the seconds and the finished jobs."""
    async def one(wf: dict[str, Any]) -> str:
        r = await client.post("/api/jobs", json={"workflow": wf})
        assert r.status == 201, await r.text()
        return (await r.json())["job_id"]

    async def wait(job_id: str) -> dict:
        while True:
            job = await (await client.get(f"/api/jobs/{job_id}")).json()
            if job["status"] not in ("queued", "running"):
                assert job["status"] == "succeeded", job["error"]
                return job
            await asyncio.sleep(0.005)

    t0 = time.perf_counter()
    if at_once:
        ids = [await one(wf) for wf in workflows]
        done = [await wait(i) for i in ids]
    else:
        done = [await wait(await one(wf)) for wf in workflows]
    return time.perf_counter() - t0, done


async def server(base: Path, name: str, models: Path, cluster: str | None = None) -> Any:
    from aiohttp.test_utils import TestClient, TestServer

    from engine.registry import default_registry
    from engine.server.app import make_app

    data = base / name
    (data / "input").mkdir(parents=True, exist_ok=True)
    for f in ("bench.png", "small.png"):
        (data / "input" / f).write_bytes((base / f).read_bytes())
    app = make_app(data, models, base / "wf", registry=default_registry(), cluster=cluster,
                   devices=None if cluster else ["cpu"])
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def main(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from engine.server.state import STATE
    from nodes.demo import DEMO_NAME, build_demo_checkpoint

    torch.set_num_threads(1)
    base = Path(tempfile.mkdtemp(prefix="kiln-cluster-bench-"))
    models = base / "models"
    build_demo_checkpoint(models / "checkpoints" / DEMO_NAME)
    Image.new("RGB", (args.size, args.size), (40, 90, 160)).save(base / "bench.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(base / "small.png")
    def heavy(mode: int) -> list[dict[str, Any]]:  # new seeds per mode: nothing is served from a cache
        return [img2img(1000 * mode + i, args.steps, DEMO_NAME) for i in range(args.jobs)]
    warm = [img2img(1, args.steps, DEMO_NAME), img2img(2, args.steps, DEMO_NAME)]
    procs = Processes(base)
    rows: list[tuple[str, int, float]] = []
    light_ms: dict[str, float] = {}
    try:
        procs.scheduler()
        procs.worker("w1", models)
        local = await server(base, "local", models)
        await run_jobs(local, warm)
        seconds, _ = await run_jobs(local, heavy(1))
        rows.append(("in-process, 1 lane", 1, seconds))
        light_s, _ = await run_jobs(local, [light()] * args.light, at_once=False)
        light_ms["in-process"] = 1000 * light_s / args.light
        await local.close()

        remote = await server(base, "cluster", models, procs.address)
        worker = remote.server.app[STATE].worker
        while len(worker.devices()) < 1:
            await asyncio.sleep(0.05)
        await run_jobs(remote, warm)
        seconds, _ = await run_jobs(remote, heavy(2))
        rows.append(("cluster, 1 worker", 1, seconds))
        light_s, _ = await run_jobs(remote, [light()] * args.light, at_once=False)
        light_ms["cluster"] = 1000 * light_s / args.light

        procs.worker("w2", models)
        while len(worker.devices()) < 2:
            await asyncio.sleep(0.05)
        await run_jobs(remote, warm + warm)  # both workers warm
        seconds, done = await run_jobs(remote, heavy(3))
        spread = {w: sum(1 for j in done if j["worker"] == w) for w in sorted({j["worker"] for j in done})}
        rows.append((f"cluster, 2 workers {spread}", 2, seconds))
        await remote.close()
    finally:
        procs.close()

    base_rate = args.jobs / rows[0][2]
    print(f"\n{args.jobs} img2img jobs, tiny SD1 checkpoint, {args.size} px, {args.steps} steps, one thread each; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<44} {'s':>7} {'jobs/s':>7} {'x in-process':>13}")
    for name, _, seconds in rows:
        rate = args.jobs / seconds
        print(f"{name:<44} {seconds:7.2f} {rate:7.2f} {rate / base_rate:13.2f}")
    one, two = args.jobs / rows[1][2], args.jobs / rows[2][2]
    print(f"2 workers / 1 worker: {two / one:.2f} (ideal 2.00, target >= 1.80)")
    print(f"scheduling overhead per job: {light_ms['cluster'] - light_ms['in-process']:.1f} ms "
          f"(light job round trip {light_ms['in-process']:.1f} ms in-process, {light_ms['cluster']:.1f} ms on the "
          f"cluster, mean of {args.light})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--light", type=int, default=30)
    asyncio.run(main(parser.parse_args()))
