"""Every performance figure of issue 16 in one interleaved run, with the machine's load per run.

    .venv/bin/python bench/perf_suite.py [--device cpu|cuda] [--size full|tiny] [--px 256]
                                         [--steps 10] [--strength 0.6] [--rounds 3]
                                         [--compile off,on] [--batches 1,2,4] [--no-startup]

One random-weight SD1 model (full SD1.5 shapes by default; nothing can be
downloaded) saved as a single-file checkpoint and loaded by Kiln's real loader;
diffusers' StableDiffusionImg2ImgPipeline gets the very same modules in memory.
On CUDA both sides run float16 with PyTorch's SDPA attention (diffusers' default
processor; Kiln's denoiser is the same diffusers UNet). Figures:

* steady state: Kiln (eager and, with --compile on, compiled) against diffusers on
  the same job (same size, steps, strength, cfg, seed, Euler), forced cold (every
  node re-runs), interleaved A B C A B C after one warm-up each; median seconds,
  UNet calls per job, ratio to diffusers;
* compiled mode: first-job cost (load + compile) against eager's first job, the
  largest pixel difference compiled vs eager (8-bit), and after how many jobs the
  compile has paid for itself;
* batching: N images as one sampler batch in one job (the workflow's ``samples``)
  against N jobs one by one, seconds per image. This is the gain cross-job batching
  would bring at most;
* cross-job batching (--queued 1,2,4): N queued txt2img / img2img jobs (--queued-workflows)
  that differ only in seed (or, with --queued-vary prompt, in seed and prompt: each job
  then also encodes its own new prompt, in both modes; with --queued-vary long-prompt the
  second job's prompt is longer than 77 tokens, so the batch's denoiser makes one network call
  per token count), run the way the server's worker batches them
  (engine.batching.run_together: shared nodes once, one KSampler batch, decode and save
  per job) against the same N jobs one by one through the executor; both warm (model
  loaded, prompts and the init image encoded and cached), each round with new seeds so
  noising, sampling, decoding and saving really run;
* start-up (CPU/any, unless --no-startup): ``kiln run`` of the same workflow in a
  fresh process, time from process start to the first node starting and to the end.

Peak memory (a ``kiln serve`` with the model loaded after one job against diffusers'
pipeline, each in a fresh process) is ``bench/peak_memory.py``; the identical-resubmit
figures are in ``bench/server_load.py``.

Each timed run records the 1-minute load average before it; a run whose load
exceeds the number of CPU cores is marked ``*`` (contended). A benchmark, not a
test: nothing is asserted. The last line is JSON with every figure.

On a machine without Kiln's virtual environment the run needs only torch,
diffusers, transformers, safetensors, networkx, msgpack, pillow and aiohttp
(accelerate is optional: without it the loader initialises modules before
overwriting them, which only costs load time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from img2img_vs_diffusers import NEGATIVE, PROMPT, UNetCalls, saved_components  # noqa: E402

CORES = os.cpu_count() or 1
#: A prompt past one 77-token window (``--queued-vary long-prompt``): its context is 154 tokens.
LONG_PROMPT = ", ".join([PROMPT] * 12)


class Timed:
    """Runs callables, keeping seconds and the load average before each run."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.runs: dict[str, list[tuple[float, float]]] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        load = os.getloadavg()[0]
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        self.runs.setdefault(name, []).append((time.perf_counter() - start, load))
        return out

    def median(self, name: str) -> float:
        return statistics.median(s for s, _ in self.runs[name])

    def row(self, name: str) -> str:
        cells = " ".join(f"{s:.3f}{'*' if load > CORES else ''}(L{load:.1f})" for s, load in self.runs[name])
        return f"{name:<28} {self.median(name):>9.3f}  {cells}"


def startup(work: Path, overrides: dict[str, Any], device: str) -> dict[str, float]:
    """A fresh ``kiln run --json``: seconds from spawning it to the first node_started and to its exit."""
    sets = [f"--set={k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, PYTHONPATH=str(REPO), KILN_DATA=str(work / "data"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(REPO / "workflows" / "img2img.json"),
                             "--json", "--models", str(work / "models"), "--input-dir", str(work / "data" / "input"),
                             "--output-dir", str(work / "cli-out"), "--device", device, "--compile", "off", *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=work)
    first = None
    job = None
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if first is None and event.get("type") == "node_started":
            first = time.perf_counter() - start
        if event.get("type") == "job_finished":
            job = float(event.get("seconds") or 0.0)
    proc.wait()
    total = time.perf_counter() - start
    return {"to_first_node_s": first or float("nan"), "total_s": total, "job_s": job or float("nan"),
            "rc": proc.returncode}


def queued_jobs(executor: Any, timed: Timed, counts: list[int], args: Any,
                kinds: list[str]) -> dict[str, dict[int, dict[str, float]]]:
    """Cross-job batching: N jobs differing in seed (and prompt), batched as the worker does, vs one by one.

    ``kinds``: "txt2img" (EmptyLatentImage) and/or "img2img" (AddNoise then KSampler, the
    suite's main workflow, both seeded by the one "seed" parameter).
    """
    import threading

    from engine.batching import BatchItem, run_together
    from engine.context import JobInfo
    from engine.workflow import load

    common = {"checkpoint": "bench.safetensors", "width": args.px, "height": args.px, "prompt": PROMPT,
              "negative": NEGATIVE, "steps": args.steps, "cfg": args.cfg, "sampler": "euler", "scheduler": "normal"}
    extra = {"txt2img": {}, "img2img": {"image": "init.png", "strength": args.strength}}
    seeds = iter(range(1000, 10 ** 6))
    figures: dict[str, dict[int, dict[str, float]]] = {}
    for kind in kinds:
        base = load(REPO / "workflows" / f"{kind}.json").with_overrides({**common, **extra[kind]})

        def jobs(n: int) -> list[Any]:
            out = []
            for i in range(n):
                seed = next(seeds)
                prompt = {"prompt": f"{PROMPT}, variation {seed}"} if args.queued_vary != "seed" else {}
                if args.queued_vary == "long-prompt" and i == 1:  # past 77 tokens: a 154-token context
                    prompt = {"prompt": f"{LONG_PROMPT}, variation {seed}"}
                out.append(base.with_overrides({"seed": seed, **prompt}))
            return out

        def batched(n: int) -> None:
            notes: list[str] = []

            def note(event: Any) -> None:
                notes.append(f"{getattr(event, 'node_type', '')}: {getattr(event, 'message', '')}")

            items = [BatchItem(executor.plan(wf), JobInfo(id=f"q{i}"), note, threading.Event())
                     for i, wf in enumerate(jobs(n))]
            outcomes = run_together(executor, items)
            assert all(o.status == "succeeded" for o in outcomes), [o.error for o in outcomes]
            assert n == 1 or any(x.startswith(f"KSampler: ran as one batch of {n} jobs") for x in notes), \
                "the sampler did not run as one batch"

        def one_by_one(n: int) -> None:
            for wf in jobs(n):
                assert executor.run(wf).status == "succeeded"

        one_by_one(1)  # warm: the prompts (and the init image's encoding) cached, the decoder loaded
        for _ in range(max(1, args.rounds - 1)):
            for n in counts:
                timed(f"{kind} {n} queued, batched", lambda: batched(n))
                timed(f"{kind} {n} queued, one by one", lambda: one_by_one(n))
        figures[kind] = {n: {"batched_s_per_image": timed.median(f"{kind} {n} queued, batched") / n,
                             "one_by_one_s_per_image": timed.median(f"{kind} {n} queued, one by one") / n}
                         for n in counts}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", default="off", help="compile modes to compare, e.g. off,on")
    parser.add_argument("--batches", default="1,2,4", help="images per job for the batching figure ('' = skip)")
    parser.add_argument("--queued", default="1,2,4",
                        help="queued txt2img jobs for the cross-job batching figure ('' = skip)")
    parser.add_argument("--queued-workflows", default="txt2img,img2img",
                        help="workflows for the cross-job batching figure (txt2img, img2img)")
    parser.add_argument("--queued-vary", choices=["seed", "prompt", "long-prompt"], default="seed",
                        help="what the queued jobs differ in: the seed, or the seed and the prompt; "
                             "long-prompt: as prompt, the second job's prompt longer than 77 tokens")
    parser.add_argument("--no-startup", action="store_true")
    args = parser.parse_args()

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from engine.context import Environment, Paths
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import load
    from nodes.runtime.models import ModelManager
    from nodes.sample_image import draw_landscape

    torch.set_grad_enabled(False)
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    work = Path(tempfile.mkdtemp(prefix="kiln-perf-"))
    t0 = time.perf_counter()
    parts = saved_components(args.size, work)
    print(f"built and saved a random-weight {args.size} SD1 model in {time.perf_counter() - t0:.1f} s", flush=True)

    init = draw_landscape(args.px, args.px)
    paths = Paths.under(work / "data", models=work / "models")
    init.save(paths.input.root / "init.png")
    overrides = {"checkpoint": "bench.safetensors", "image": "init.png", "width": args.px, "height": args.px,
                 "prompt": PROMPT, "negative": NEGATIVE, "strength": args.strength, "steps": args.steps,
                 "cfg": args.cfg, "sampler": "euler", "scheduler": "normal", "seed": 42}
    workflow = load(REPO / "workflows" / "img2img.json").with_overrides(overrides)
    decode = next(i for i, n in workflow.nodes.items() if n.type == "VAEDecode")
    registry = default_registry()
    modes = [m for m in args.compile.split(",") if m]
    executors: dict[str, Any] = {}
    for mode in modes:
        manager = ModelManager(device=args.device, compile_mode=mode, compile_cache=work / "data" / "compiled")
        executors[mode] = Executor(registry, Environment(paths=paths, models=manager))

    pipe = StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False).to(args.device, dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    timed = Timed(sync)
    calls = UNetCalls()
    unet_calls: dict[str, int] = {}
    images: dict[str, Any] = {}

    def kiln(mode: str, wf: Any = workflow) -> Callable[[], Any]:
        def go() -> Any:
            before = calls.count
            outcome = executors[mode].run(wf, force=True)
            assert outcome.status == "succeeded", outcome.error and outcome.error.message
            unet_calls[f"kiln-{mode}"] = calls.count - before
            return outcome.results[decode][0]
        return go

    def diffusers() -> None:
        before = calls.count
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init, strength=args.strength,
             num_inference_steps=args.steps, guidance_scale=args.cfg,
             generator=torch.Generator("cpu").manual_seed(42))
        unet_calls["diffusers"] = calls.count - before

    # First jobs: loading (and compiling) is in them.
    first: dict[str, float] = {}
    for mode in modes:
        images[mode] = timed(f"first kiln-{mode}", kiln(mode))
        first[mode] = timed.runs[f"first kiln-{mode}"][0][0]
        print(f"first job, kiln --compile {mode}: {first[mode]:.1f} s", flush=True)
    timed("first diffusers", diffusers)

    names = [f"kiln-{m}" for m in modes] + ["diffusers"]
    for _ in range(args.rounds):
        for mode in modes:
            images[mode] = timed(f"kiln-{mode}", kiln(mode))
        timed("diffusers", diffusers)

    batching: dict[int, dict[str, float]] = {}
    eager = modes[0]
    for n in [int(b) for b in args.batches.split(",") if b]:
        batched = workflow.with_overrides({"samples": n})
        singles = [workflow.with_overrides({"seed": 42 + i}) for i in range(n)]
        for _ in range(max(1, args.rounds - 1)):
            timed(f"batch {n} in one job", kiln(eager, batched))
            timed(f"{n} jobs one by one", lambda: [kiln(eager, wf)() for wf in singles])
        batching[n] = {"one_job_s_per_image": timed.median(f"batch {n} in one job") / n,
                       "one_by_one_s_per_image": timed.median(f"{n} jobs one by one") / n}

    queued = queued_jobs(executors[eager], timed, [int(q) for q in args.queued.split(",") if q], args,
                         [k for k in args.queued_workflows.split(",") if k])

    start_figures = None if args.no_startup else startup(work, overrides, args.device)

    print(f"\n{args.size} SD1 {args.px}x{args.px}, {args.steps} steps at strength {args.strength} "
          f"(= {int(args.steps * args.strength)} denoising steps), cfg {args.cfg}, Euler, {dtype}, "
          f"device {args.device} ({gpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{CORES} cores; * = load above core count")
    print(f"{'run':<28} {'median s':>9}  runs (load before each)")
    for name in [f"first kiln-{m}" for m in modes] + ["first diffusers"] + names:
        print(timed.row(name))
    med = {name: timed.median(name) for name in names}
    for mode in modes:
        print(f"kiln --compile {mode} / diffusers: {med[f'kiln-{mode}'] / med['diffusers']:.3f} "
              f"(UNet calls {unet_calls.get(f'kiln-{mode}')} vs {unet_calls.get('diffusers')})")
    compiled: dict[str, Any] = {}
    if "on" in modes and "off" in modes:
        diff = (images["on"].float() - images["off"].float()).abs().max().item() * 255
        saved = med["kiln-off"] - med["kiln-on"]
        cost = first["on"] - first["off"]
        paid = cost / saved if saved > 0 else float("inf")
        compiled = {"compile_cost_s": cost, "steady_ratio_on_off": med["kiln-on"] / med["kiln-off"],
                    "max_pixel_diff_8bit": diff, "jobs_to_pay_back": paid}
        print(f"compiled: first-job extra {cost:.1f} s, steady {med['kiln-on']:.3f} s vs eager {med['kiln-off']:.3f} s, "
              f"pays back after {paid:.1f} jobs; largest pixel difference vs eager {diff:.2f}/255")
    for n, figs in batching.items():
        print(f"{n} image(s): {figs['one_job_s_per_image']:.3f} s/image as one batch, "
              f"{figs['one_by_one_s_per_image']:.3f} s/image one job each "
              f"(x{figs['one_by_one_s_per_image'] / figs['one_job_s_per_image']:.2f})")
    for name in (f"batch {n} in one job" for n in batching):
        print(timed.row(name))
    for name in (f"{n} jobs one by one" for n in batching):
        print(timed.row(name))
    for kind, by_n in queued.items():
        for n, figs in by_n.items():
            print(f"{kind}, {n} queued job(s): {figs['batched_s_per_image']:.3f} s/image batched, "
                  f"{figs['one_by_one_s_per_image']:.3f} s/image one by one "
                  f"(throughput x{figs['one_by_one_s_per_image'] / figs['batched_s_per_image']:.2f})")
        for n in by_n:
            print(timed.row(f"{kind} {n} queued, batched"))
            print(timed.row(f"{kind} {n} queued, one by one"))
    if start_figures:
        print(f"kiln run in a fresh process: first node after {start_figures['to_first_node_s']:.2f} s, "
              f"exit after {start_figures['total_s']:.2f} s, of which the job {start_figures['job_s']:.2f} s "
              f"(rc {start_figures['rc']})")
    print(json.dumps({"device": args.device, "gpu": gpu, "size": args.size, "px": args.px, "medians_s": med,
                      "first_s": first, "compiled": compiled, "batching": batching, "queued": queued, "startup": start_figures,
                      "runs": timed.runs}))


if __name__ == "__main__":
    main()
