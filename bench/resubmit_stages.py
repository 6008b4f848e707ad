"""Where the server-side time of an identical resubmit goes, stage by stage.

    .venv/bin/python bench/resubmit_stages.py [--resubmits 300] [--burners 0]

Starts ``kiln serve`` (the same workflow and data as ``bench/server_load.py``) in a
subprocess whose server functions are wrapped, in that process only, to note
``time.perf_counter_ns()`` (CLOCK_MONOTONIC, comparable across processes on
Linux) at each stage of a cached resubmit; the server's code is not changed, so
the stamps cost nothing outside this probe. The client notes the same clock just
before its POST, when the reply arrives and when ``job_finished`` arrives on its
websocket. Stages, in the order a resubmit passes them:

  post       client: just before the POST
  http_in    loop: the route handler starts (the request is parsed)
  body       loop: the JSON body is read
  offered    loop: the submission is offered to an idle lane (none idle: a pool thread runs it)
  taken      lane/pool: the submission starts running there (the report counts which)
  validated  lane: the workflow is validated (submission.prepare)
  stored     lane: the queue row is committed (JobStore.add)
  claimed    lane: the job is claimed (claim_next)
  planned    lane: the plan to run it with is ready (job_plan)
  finished   lane: the JobFinished event is made (its timestamp is the benchmark's "server side")
  committed  lane: the outcome is committed (JobStore.finish)
  flushed    lane: the held loop calls are handed to the loop (LoopCalls.flush)
  drain      loop: the loop starts delivering them
  replied    loop: the reply is written
  sent       loop: job_finished is written to the websocket
  notified   client: job_finished arrives

``--burners N`` starts N CPU-bound processes for the run (and ends them, by pid).
``--profile FILE`` writes a cProfile of the lane thread there instead (it slows the lane:
read it for where the CPU goes, not for the timings).
Prints per-stage deltas p50 / p90 / max (ms) and the load average. A benchmark:
nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_load import (free_port, job_end, percentile, stop_server, wait_ready, workflow,  # noqa: E402
                         write_input)

STAGES = ["post", "http_in", "body", "offered", "taken", "validated", "stored", "claimed", "planned",
          "finished", "committed", "flushed", "drain", "replied", "sent", "notified"]


# -- the probe, inside the server process -----------------------------------------------------

def install_probe(out: Path) -> None:
    """Wrap the server's stage functions to note the clock; the notes go to ``out`` at exit."""
    import atexit
    import functools
    import threading

    from engine import events
    from engine.server import api_routes, hub, jobs, loop_calls, store, worker

    notes: list[tuple[str, int, str]] = []
    clock = time.perf_counter_ns

    def note(stage: str) -> None:
        notes.append((stage, clock(), threading.current_thread().name))

    def after(owner: Any, name: str, stage: str, when: Any = None) -> None:
        original = getattr(owner, name)
        if asyncio.iscoroutinefunction(original):
            @functools.wraps(original)
            async def wrapped(*a: Any, **k: Any) -> Any:
                result = await original(*a, **k)
                if when is None or when(result, a):
                    note(stage)
                return result
        else:
            @functools.wraps(original)
            def wrapped(*a: Any, **k: Any) -> Any:
                result = original(*a, **k)
                if when is None or when(result, a):
                    note(stage)
                return result
        setattr(owner, name, wrapped)

    def before(owner: Any, name: str, stage: str, when: Any = None) -> None:
        original = getattr(owner, name)
        if asyncio.iscoroutinefunction(original):
            @functools.wraps(original)
            async def wrapped(*a: Any, **k: Any) -> Any:
                if when is None or when(a):
                    note(stage)
                return await original(*a, **k)
        else:
            @functools.wraps(original)
            def wrapped(*a: Any, **k: Any) -> Any:
                if when is None or when(a):
                    note(stage)
                return original(*a, **k)
        setattr(owner, name, wrapped)

    before(api_routes, "post_job", "http_in")
    after(api_routes, "read_object", "body")
    after(worker.Worker, "offer", "offered")
    before(jobs, "submit", "taken")
    after(jobs, "prepare", "validated")
    after(store.JobStore, "add", "stored")
    after(store.JobStore, "claim_next", "claimed", lambda r, a: r is not None)
    after(worker, "job_plan", "planned")
    before(worker.JobReport, "event", "finished", lambda a: isinstance(a[1], events.JobFinished))
    after(store.JobStore, "finish", "committed")
    before(loop_calls.LoopCalls, "flush", "flushed", lambda a: getattr(a[0]._holding, "on", False))
    before(loop_calls.LoopCalls, "_drain", "drain")
    after(api_routes, "reply_then_release", "replied")
    before(hub.Client, "_send", "sent", lambda a: isinstance(a[1].event, events.JobFinished))

    def dump() -> None:
        out.write_text(json.dumps(notes))
    atexit.register(dump)


def serve_probed(out: str, argv: list[str]) -> int:
    install_probe(Path(out))
    profile_to = os.environ.get("PROBE_PROFILE")
    if profile_to:  # the lane's own time, by function (cProfile; slows the lane, so not for timings)
        import atexit
        import cProfile

        from engine.server import worker
        prof = cProfile.Profile()
        loop_original = worker.Worker._loop

        def profiled(self: Any, lane: Any) -> None:
            prof.enable()
            try:
                loop_original(self, lane)
            finally:
                prof.disable()
        worker.Worker._loop = profiled
        atexit.register(lambda: prof.dump_stats(profile_to))
    from engine.cli import main as cli_main
    return cli_main(argv)


# -- the client --------------------------------------------------------------------------------

async def resubmits(base: str, count: int) -> list[dict[str, int]]:
    import aiohttp

    body = {"workflow": workflow("bench/resubmit"), "client_id": "resubmit"}
    rows: list[dict[str, int]] = []
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base.replace('http', 'ws')}/ws?clientId=resubmit&protocol=kiln")
        await ws.receive()
        for i in range(count + 1):  # the first fills the cache
            t0 = time.perf_counter_ns()
            async with session.post(f"{base}/api/jobs", json=body) as r:
                job_id = (await r.json())["job_id"]
            t_reply = time.perf_counter_ns()
            await job_end(ws, job_id)
            if i:
                rows.append({"post": t0, "reply": t_reply, "notified": time.perf_counter_ns()})
        await ws.close()
    return rows


def attach(rows: list[dict[str, int]], notes: list[tuple[str, int, str]]) -> list[dict[str, int]]:
    """Each server note goes to the resubmit whose POST came last before it (first note of a stage wins)."""
    notes = sorted(notes, key=lambda n: n[1])
    i = 0
    for row, nxt in zip(rows, rows[1:] + [None]):
        end = nxt["post"] if nxt else 1 << 62
        while i < len(notes) and notes[i][1] < row["post"]:
            i += 1
        while i < len(notes) and notes[i][1] < end:
            stage, t, thread = notes[i]
            if stage not in row:
                row[stage] = t
                if stage == "taken":
                    row["on_lane"] = int(thread.startswith("kiln-worker"))
            i += 1
    return rows


def report(rows: list[dict[str, int]], title: str) -> None:
    print(title)
    present = [s for s in STAGES if all(s in r for r in rows)]
    prev = present[0]
    for stage in present[1:]:
        d = [(r[stage] - r[prev]) / 1e6 for r in rows]
        print(f"  {prev:>9} -> {stage:<9} p50 {percentile(d, 50):6.3f}  p90 {percentile(d, 90):6.3f}"
              f"  max {max(d):7.3f} ms")
        prev = stage
    for a, b, label in (("post", "finished", "server side (post -> JobFinished)"),
                        ("post", "notified", "notified"), ("post", "reply", "reply")):
        if all(a in r and b in r for r in rows):
            d = [(r[b] - r[a]) / 1e6 for r in rows]
            print(f"  {label:<36} p50 {percentile(d, 50):6.3f}  p90 {percentile(d, 90):6.3f}  "
                  f"max {max(d):7.3f} ms")
    lanes = sum(r.get("on_lane", 0) for r in rows)
    print(f"  submissions stored on the lane: {lanes}, on a pool thread: {len(rows) - lanes}")
    missing = {s: sum(s not in r for r in rows) for s in STAGES}
    missing = {s: n for s, n in missing.items() if n}
    if missing:
        print(f"  stages missing in some resubmits: {missing}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-probe":
        return serve_probed(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resubmits", type=int, default=300)
    parser.add_argument("--burners", type=int, default=0, help="CPU-bound processes to run meanwhile")
    parser.add_argument("--raw", help="write every resubmit's stamps (JSON) here")
    parser.add_argument("--profile", help="write a cProfile of the server's lane thread here")
    args = parser.parse_args()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-stages-") as tmp:
            data = Path(tmp) / "data"
            write_input(data, 64)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            env.pop("KILN_TOKEN", None)
            if args.profile:
                env["PROBE_PROFILE"] = str(Path(args.profile).resolve())
            notes_file = Path(tmp) / "notes.json"
            log = open(Path(tmp) / "server.log", "wb")
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve-probe", str(notes_file), "serve",
                 "--host", "127.0.0.1", "--port", str(port), "--data", str(data),
                 "--models", str(Path(tmp) / "models"), "--workflows", str(Path(tmp) / "wf")],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
            try:
                asyncio.run(wait_ready(base, proc))
                load0 = os.getloadavg()[0]
                rows = asyncio.run(resubmits(base, args.resubmits))
                load1 = os.getloadavg()[0]
            finally:
                stop_server(proc, log)
            notes = json.loads(notes_file.read_text())
    finally:
        for b in burners:
            b.kill()
            b.wait()
    rows = attach(rows, notes)
    if args.raw:
        Path(args.raw).write_text(json.dumps(rows))
    report(rows, f"{len(rows)} identical resubmits, {args.burners} burner(s), load {load0:.2f} -> {load1:.2f}")
    for on_lane, name in ((1, "stored on the lane"), (0, "stored on a pool thread")):
        group = [r for r in rows if r.get("on_lane") == on_lane]
        if group and len(group) < len(rows):
            report(group, f"-- the {len(group)} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
