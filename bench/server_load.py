"""Server load benchmark: N cheap jobs from M concurrent clients against a real ``kiln serve``.

    .venv/bin/python bench/server_load.py [--jobs 200] [--clients 20] [--size 64]

Starts ``kiln serve`` as a subprocess on a free loopback port with a fresh data
folder, and runs a cheap workflow made of built-in nodes (LoadImage ->
ImageResize -> SaveImage on a small PNG, ``force`` so every node really runs).
Each client holds its own websocket (Kiln protocol) and submits its share of the
jobs one after another as fast as the server answers. Reported:

* submit latency (POST /api/jobs round trip) p50 / p99,
* jobs per second, from the first submission to the last ``job_finished``,
* websocket event delay: arrival time minus the ``job_finished`` event's own
  timestamp (both wall-clock ms on this machine) p50 / p99,
* the same jobs run in-process through :class:`engine.executor.Executor`
  directly, and the server's throughput as a fraction of it,
* an identical resubmit (``--resubmits`` times, no ``force``: every node cached):
  the POST round trip, the server's side (submission to the job_finished event's
  timestamp), the client's whole round trip to that event on its websocket, and
  the server process's CPU time per resubmit (robust to a loaded machine, where
  the wall-clock figures include waiting for a core).

It also checks that nothing was lost: every submitted job finished and ended
``succeeded`` in GET /api/jobs/{id}. A benchmark, not a test: no timing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def workflow(prefix: str = "bench/job") -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "bench.png"}},
        "2": {"type": "ImageResize", "inputs": {"image": ["1", 0], "width": 32, "height": 32, "mode": "crop",
                                                "multiple_of": "8", "pad_color": "#000000"}},
        "3": {"type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }}


def write_input(data: Path, size: int) -> None:
    from PIL import Image

    (data / "input").mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (size, size))
    im.putdata([((x * 7) % 256, (y * 5) % 256, (x * y) % 256) for y in range(size) for x in range(size)])
    im.save(data / "input" / "bench.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# -- the server run ---------------------------------------------------------------------------

def stop_server(proc: subprocess.Popen, log: Any, timeout: float = 30) -> None:
    """End a benchmark's server process (SIGTERM, then SIGKILL after ``timeout`` s) and close its log."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60.0) -> float:
    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {proc.returncode}")
            try:
                async with session.get(f"{base}/prompt") as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("kiln serve did not answer in time")


async def one_job(session: aiohttp.ClientSession, base: str, client_id: str | None = None) -> str:
    body = {"workflow": workflow(), "force": True}
    if client_id:
        body["client_id"] = client_id
    async with session.post(f"{base}/api/jobs", json=body) as r:
        if r.status != 201:
            raise RuntimeError(f"submit failed: {r.status} {await r.text()}")
        return (await r.json())["job_id"]


async def client_run(base: str, index: int, count: int, results: dict[str, Any]) -> None:
    """One client: its websocket open first, then ``count`` submissions, then wait for every finish."""
    client_id = f"bench-{index}"
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base.replace('http', 'ws')}/ws?clientId={client_id}&protocol=kiln")
        await ws.receive()  # the status greeting
        submitted: set[str] = set()
        finished: dict[str, float] = {}
        delays: list[float] = []

        async def listen() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                if event.get("type") in ("job_finished", "job_failed", "job_interrupted"):
                    now = time.time() * 1000
                    finished[event["job_id"]] = time.perf_counter()
                    delays.append(now - event["timestamp"])
                    if event["type"] != "job_finished":
                        results["failed"].append(event)
                    if len(finished) >= count and submitted <= set(finished):
                        return

        listener = asyncio.create_task(listen())
        for _ in range(count):
            t0 = time.perf_counter()
            job_id = await one_job(session, base, client_id)
            results["latency"].append(time.perf_counter() - t0)
            results["first_submit"] = min(results.get("first_submit", t0), t0)
            submitted.add(job_id)
        await asyncio.wait_for(listener, timeout=600)
        await ws.close()
        results["delays"].extend(delays)
        results["finished_at"].extend(finished.values())
        results["ids"].extend(submitted)


async def verify(base: str, ids: list[str]) -> int:
    async with aiohttp.ClientSession() as session:
        bad = 0
        for job_id in ids:
            async with session.get(f"{base}/api/jobs/{job_id}") as r:
                if r.status != 200 or (await r.json())["status"] != "succeeded":
                    bad += 1
        return bad


async def server_bench(base: str, jobs: int, clients: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:  # warm-up: the first job imports torch in the server
        job_id = await one_job(session, base)
        while True:
            async with session.get(f"{base}/api/jobs/{job_id}") as r:
                if (await r.json())["status"] in ("succeeded", "failed"):
                    break
            await asyncio.sleep(0.05)
    results: dict[str, Any] = {"latency": [], "delays": [], "finished_at": [], "ids": [], "failed": []}
    shares = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
    await asyncio.gather(*(client_run(base, i, n, results) for i, n in enumerate(shares) if n))
    elapsed = max(results["finished_at"]) - results["first_submit"]
    results["elapsed"] = elapsed
    results["lost"] = jobs - len(set(results["ids"]))
    results["not_succeeded"] = await verify(base, results["ids"])
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


async def job_end(ws: Any, job_id: str) -> dict[str, Any]:
    """The ``job_finished`` event of ``job_id`` on a Kiln-protocol websocket; a failed job raises."""
    while True:
        event = json.loads((await ws.receive(timeout=60)).data)
        if event.get("job_id") == job_id and event.get("type") in ("job_finished", "job_failed"):
            break
    if event["type"] != "job_finished":
        raise RuntimeError(f"resubmitted job failed: {event}")
    return event


async def resubmit_bench(base: str, count: int) -> dict[str, list[float]]:
    """The same workflow submitted ``count`` times in a row (no ``force``): every node is cached.

    Per submission (ms): ``reply`` = POST round trip; ``server`` = the job_finished
    event's own timestamp minus the wall clock just before the POST (the server's
    side: request, validation, the durable queue row, the cache-hit run, history);
    ``notified`` = the event's arrival on the websocket minus the same start (the
    client's whole round trip, including any hold of the events after the reply).
    """
    out: dict[str, list[float]] = {"reply": [], "server": [], "notified": []}
    body = {"workflow": workflow("bench/resubmit"), "client_id": "resubmit"}
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base.replace('http', 'ws')}/ws?clientId=resubmit&protocol=kiln")
        await ws.receive()  # the status greeting
        for i in range(count + 1):  # the first run fills the cache
            wall, t0 = time.time() * 1000, time.perf_counter()
            async with session.post(f"{base}/api/jobs", json=body) as r:
                job_id = (await r.json())["job_id"]
            reply = time.perf_counter() - t0
            event = await job_end(ws, job_id)
            if i:
                out["reply"].append(reply * 1000)
                out["server"].append(event["timestamp"] - wall)
                out["notified"].append((time.perf_counter() - t0) * 1000)
        await ws.close()
    return out


# -- the in-process baseline ---------------------------------------------------------------------

def inprocess_bench(data: Path, jobs: int) -> float:
    """Seconds for the same jobs run one after another through the executor, no server."""
    from engine.context import Environment, Paths
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.formats import parse_document as parse

    registry = default_registry()
    env = Environment(paths=Paths.under(data))
    executor = Executor(registry, env)
    wf = parse(workflow("inproc/job"), registry)
    executor.run(wf, force=True)  # warm-up (imports torch)
    start = time.perf_counter()
    for _ in range(jobs):
        outcome = executor.run(wf, force=True)
        if outcome.status != "succeeded":
            raise RuntimeError(f"in-process job failed: {outcome}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="side of the input PNG")
    parser.add_argument("--resubmits", type=int, default=50, help="identical resubmissions timed one by one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        data = Path(tmp) / "data"
        write_input(data, args.size)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("KILN_TOKEN", None)
        log = open(Path(tmp) / "server.log", "wb")  # a file, not a pipe nobody drains
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data", str(data), "--models", str(Path(tmp) / "models"), "--workflows", str(Path(tmp) / "wf")],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            ready = asyncio.run(wait_ready(base, proc))
            res = asyncio.run(server_bench(base, args.jobs, args.clients))
            cpu0 = cpu_seconds(proc.pid)
            again = asyncio.run(resubmit_bench(base, args.resubmits)) if args.resubmits else None
            cpu_per_resubmit = (cpu_seconds(proc.pid) - cpu0) * 1000 / max(1, args.resubmits + 1)
        finally:
            stop_server(proc, log)
        write_input(Path(tmp) / "inproc", args.size)
        inproc = inprocess_bench(Path(tmp) / "inproc", args.jobs)

    server_rate = args.jobs / res["elapsed"]
    inproc_rate = args.jobs / inproc
    lat = [v * 1000 for v in res["latency"]]
    rows = [
        ("jobs x clients", f"{args.jobs} x {args.clients}"),
        ("server ready after", f"{ready:.2f} s"),
        ("submit latency p50", f"{percentile(lat, 50):.1f} ms"),
        ("submit latency p99", f"{percentile(lat, 99):.1f} ms"),
        ("server jobs/s", f"{server_rate:.1f}"),
        ("ws event delay p50", f"{percentile(res['delays'], 50):.1f} ms"),
        ("ws event delay p99", f"{percentile(res['delays'], 99):.1f} ms"),
        ("in-process jobs/s", f"{inproc_rate:.1f}"),
        ("server / in-process", f"{server_rate / inproc_rate:.2f}"),
        ("lost / not succeeded", f"{res['lost']} / {res['not_succeeded'] + len(res['failed'])}"),
    ]
    if again:
        rows += [(f"identical resubmit {k} p50 / p90", f"{percentile(v, 50):.1f} / {percentile(v, 90):.1f} ms")
                 for k, v in again.items()]
        rows.append(("identical resubmit server CPU", f"{cpu_per_resubmit:.2f} ms per job (user + system, all threads)"))
    width = max(len(k) for k, _ in rows)
    print(f"Kiln server load (LoadImage -> ImageResize -> SaveImage, {args.size}px PNG, force)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0 if res["lost"] == 0 and res["not_succeeded"] == 0 and not res["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
