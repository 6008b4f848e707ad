"""Peak resident memory: a Kiln server with one SD1 model after one img2img job, against diffusers' pipeline.

    .venv/bin/python bench/peak_memory.py [--size full|tiny] [--px 256] [--steps 2] [--strength 0.6]

One random-weight SD1 model (full SD1.5 shapes by default; nothing can be
downloaded) is saved twice with the same fp32 weights: as a single-file
checkpoint (what Kiln users load) and as a diffusers folder (what
``StableDiffusionImg2ImgPipeline.from_pretrained`` loads). Then, each in its own
fresh process, one after the other:

* Kiln: ``kiln serve`` on a loopback port; one img2img job (workflows/img2img.json
  at ``--px``, Euler) is submitted through POST /api/jobs and awaited; the server's
  peak resident set (VmHWM from /proc) is read after the job, with the model still
  loaded, as a long-running server holds it;
* diffusers: a Python process loads the pipeline from the folder and runs the same
  job (same prompt, size, steps, strength, cfg, seed), then reports its VmHWM.

The steps do not change the peak (the weights and one step's activations make it),
so a few are enough. Linux only (/proc). A benchmark, not a test: nothing is
asserted. The last line is JSON.
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
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from img2img_vs_diffusers import NEGATIVE, PROMPT, saved_components  # noqa: E402
from server_load import free_port, stop_server, wait_ready  # noqa: E402

DIFFUSERS_JOB = """
import json, sys, torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image
folder, image, px, steps, strength, cfg, prompt, negative = sys.argv[1:9]
torch.set_grad_enabled(False)
pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False, local_files_only=True)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
pipe(prompt=prompt, negative_prompt=negative, image=Image.open(image).convert("RGB"), strength=float(strength),
     num_inference_steps=int(steps), guidance_scale=float(cfg), generator=torch.Generator("cpu").manual_seed(42))
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({k: int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}))
"""


def proc_memory(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a live process, in bytes."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}


async def run_job(base: str, doc: dict[str, Any], params: dict[str, Any], timeout: float) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/api/jobs", json={"workflow": doc, "params": params}) as r:
            if r.status != 201:
                raise RuntimeError(f"submit failed: {r.status} {await r.text()}")
            job_id = (await r.json())["job_id"]
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            async with session.get(f"{base}/api/jobs/{job_id}") as r:
                job = await r.json()
            if job["status"] not in ("queued", "running"):
                return job
            await asyncio.sleep(0.5)
    raise RuntimeError("the job did not finish in time")


def kiln_server(work: Path, params: dict[str, Any], timeout: float, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("KILN_TOKEN", None)
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--data", str(work / "data"), "--models", str(work / "models"),
                             "--workflows", str(work / "wf"), *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=log)
    try:
        asyncio.run(wait_ready(base, proc))
        doc = json.loads((REPO / "workflows" / "img2img.json").read_text())
        start = time.perf_counter()
        job = asyncio.run(run_job(base, doc, params, timeout))
        seconds = time.perf_counter() - start
        if job["status"] != "succeeded":
            raise RuntimeError(f"the Kiln job ended {job['status']}: {job.get('error')}")
        return {**proc_memory(proc.pid), "job_s": seconds}
    finally:
        stop_server(proc, log)


def diffusers_process(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", DIFFUSERS_JOB, str(work / "diffusers"),
                          str(work / "data" / "input" / "init.png"), str(args.px), str(args.steps),
                          str(args.strength), str(args.cfg), PROMPT, NEGATIVE],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"the diffusers process failed: {out.stderr[-2000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "job_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--order", default="kiln,diffusers",
                        help="sides in the order their fresh processes run: kiln, kiln-lean (--lean-memory), diffusers")
    args = parser.parse_args()

    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from nodes.sample_image import draw_landscape

    work = Path(tempfile.mkdtemp(prefix="kiln-mem-"))
    t0 = time.perf_counter()
    parts = saved_components(args.size, work)
    StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(str(work / "diffusers"))
    weights = sum(p.numel() * p.element_size() for n in ("unet", "vae", "text_encoder") for p in parts[n].parameters())
    del parts
    (work / "data" / "input").mkdir(parents=True)
    draw_landscape(args.px, args.px).save(work / "data" / "input" / "init.png")
    print(f"built and saved a random-weight {args.size} SD1 model ({weights / 2**20:.0f} MiB fp32) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    params = {"checkpoint": "bench.safetensors", "image": "init.png", "width": args.px, "height": args.px,
              "prompt": PROMPT, "negative": NEGATIVE, "strength": args.strength, "steps": args.steps,
              "cfg": args.cfg, "sampler": "euler", "scheduler": "normal", "seed": 42}
    results: dict[str, Any] = {}
    for side in args.order.split(","):
        load = os.getloadavg()[0]
        if side == "diffusers":
            results[side] = diffusers_process(work, args)
        else:  # "kiln", or "kiln-lean" (kiln serve --lean-memory)
            results[side] = kiln_server(work, params, args.timeout, ("--lean-memory",) if side == "kiln-lean" else ())
        results[side]["load"] = load
        print(f"{side}: peak {results[side]['VmHWM'] / 2**20:.0f} MiB, resident after the job "
              f"{results[side]['VmRSS'] / 2**20:.0f} MiB ({results[side]['job_s']:.1f} s, load {load:.1f})", flush=True)
    kiln, ref = results["kiln"], results["diffusers"]
    print(f"\n{args.size} SD1 img2img {args.px}x{args.px}, {args.steps} steps, fp32 on the CPU, "
          f"torch {torch.__version__}; each side in its own fresh process")
    print(f"{'':<28}{'Kiln server':>14}{'diffusers':>14}{'ratio':>8}")
    for key, label in (("VmHWM", "peak resident (VmHWM)"), ("VmRSS", "resident after the job")):
        print(f"{label:<28}{kiln[key] / 2**20:>10.0f} MiB{ref[key] / 2**20:>10.0f} MiB{kiln[key] / ref[key]:>8.3f}")
    print(json.dumps({"size": args.size, "px": args.px, "steps": args.steps, "weights_bytes": weights,
                      "kiln": kiln, "diffusers": ref}))


if __name__ == "__main__":
    main()
