"""Cross-job batching (engine.batching, engine.server.batching, KSampler's Batch declaration).

Engine level, with stub nodes: jobs differing only in a batchable node's declared
inputs share their common nodes, run that node as one call, and keep their own
events and outcomes; a failing batch falls back to per-job runs so only the bad
job fails. Server level, with the tiny SD1 checkpoint on a real loopback server:
three queued jobs differing in seed (one also in prompt, a long one) run as one sampler batch (each job is
told so in a node message), each image equals the same job run alone within
1/255, each job has its own history entry, files and websocket events (its own live
previews among them), and a job with another graph is not batched.
"""
from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from PIL import Image

from engine import types as T
from engine.batching import BatchItem, batch_key, run_together
from engine.context import Environment, JobInfo, NodeError
from engine.events import JobFailed, JobFinished, JobStarted, NodeFinished, NodeMessage, Preview, Progress
from engine.executor import Executor
from engine.formats import parse_document
from engine.node import Batch, Input, Output, Result, define_node
from engine.registry import Registry

CALLS: list[tuple[str, Any]] = []


def _ticks(ctx, ticks: int, delay: float) -> None:
    for i in range(ticks):
        ctx.progress(i + 1, ticks)
        time.sleep(delay)


def _noisy_batch(ctx, items, value, scale, ticks=3, delay=0.0):
    CALLS.append(("batch", [item["seed"] for item in items]))
    if any(item["seed"] == 13 for item in items):
        raise RuntimeError("seed 13 breaks the batch")
    _ticks(ctx, ticks, delay)
    return [(value * scale + item["seed"],) for item in items]


@define_node("Constant", inputs=[Input("value", T.FLOAT)], outputs=[Output("value", T.FLOAT)])
def constant(ctx, value):
    CALLS.append(("constant", value))
    return (value,)


@define_node("Noisy", inputs=[Input("value", T.FLOAT), Input("seed", T.INT, default=0, min=0, max=100),
                              Input("scale", T.FLOAT, default=1.0), Input("ticks", T.INT, default=3, min=1, max=10000),
                              Input("delay", T.FLOAT, default=0.0, min=0.0, max=1.0)],
             outputs=[Output("value", T.FLOAT)], batch=Batch(vary=("seed",), run=_noisy_batch))
def noisy(ctx, value, seed, scale, ticks=3, delay=0.0):
    CALLS.append(("alone", seed))
    if seed == 13:
        raise NodeError("seed 13 is unlucky", "seed")
    _ticks(ctx, ticks, delay)
    return (value * scale + seed,)


@define_node("Keep", inputs=[Input("value", T.FLOAT)], output_node=True)
def keep(ctx, value):
    CALLS.append(("keep", value))
    return Result(ui={"value": [value]})


def _registry() -> Registry:
    registry = Registry()
    for spec in (constant, noisy, keep):
        registry.add(spec)
    return registry


def _prompt(seed: int, scale: float = 2.0) -> dict[str, Any]:
    return {"1": {"class_type": "Constant", "inputs": {"value": 5.0}},
            "2": {"class_type": "Noisy", "inputs": {"value": ["1", 0], "seed": seed, "scale": scale}},
            "3": {"class_type": "Keep", "inputs": {"value": ["2", 0]}}}


def _together(tmp_path: Path, seeds: list[int]) -> tuple[list[Any], list[list[Any]]]:
    registry = _registry()
    executor = Executor(registry, Environment.for_folder(tmp_path))
    events: list[list[Any]] = [[] for _ in seeds]
    items = [BatchItem(executor.plan(parse_document(_prompt(seed), registry)), JobInfo(id=f"job{seed}"),
                       events[i].append, threading.Event()) for i, seed in enumerate(seeds)]
    return run_together(executor, items), events


def test_the_batch_key_ignores_only_declared_inputs(tmp_path: Path) -> None:
    registry = _registry()
    executor = Executor(registry, Environment.for_folder(tmp_path))

    def key(prompt: dict) -> str | None:
        return batch_key(executor.plan(parse_document(prompt, registry)))

    assert key(_prompt(1)) == key(_prompt(2)) is not None
    assert key(_prompt(1, scale=3.0)) != key(_prompt(1))
    plain = {"1": {"class_type": "Constant", "inputs": {"value": 1.0}},
             "2": {"class_type": "Keep", "inputs": {"value": ["1", 0]}}}
    assert key(plain) is None  # nothing to batch: the worker runs it as usual


def test_jobs_share_common_nodes_and_run_the_batchable_one_once(tmp_path: Path) -> None:
    CALLS.clear()
    outcomes, events = _together(tmp_path, [1, 2, 3])
    assert [o.status for o in outcomes] == ["succeeded"] * 3
    assert [o.outputs["3"]["value"] for o in outcomes] == [[11.0], [12.0], [13.0]]  # each its single result
    assert CALLS.count(("constant", 5.0)) == 1  # the shared node ran once
    assert ("batch", [1, 2, 3]) in CALLS and not any(kind == "alone" for kind, _ in CALLS)
    assert sorted(v for kind, v in CALLS if kind == "keep") == [11.0, 12.0, 13.0]  # output nodes: per job
    for i, seen in enumerate(events):
        job = f"job{i + 1}"
        assert all(e.job_id == job for e in seen)
        assert isinstance(seen[0], JobStarted) and isinstance(seen[-1], JobFinished)
        assert [e.value for e in seen if isinstance(e, Progress)] == [1, 2, 3]
        notes = [e.message for e in seen if isinstance(e, NodeMessage)]
        assert len(notes) == 1 and "one batch of 3 jobs" in notes[0]
        assert {e.node_id for e in seen if isinstance(e, NodeFinished)} == {"1", "2", "3"}
        assert seen[-1].executed == ["1", "2", "3"]


def _painted_batch(ctx, items, value):
    """Each job's own preview (its seed in the bytes), in the items' order."""
    ctx.progress(1, 1, [Preview(data=bytes([item["seed"]])) for item in items])
    return [(value + item["seed"],) for item in items]


@define_node("Painted", inputs=[Input("value", T.FLOAT), Input("seed", T.INT, default=0, min=0, max=100)],
             outputs=[Output("value", T.FLOAT)], batch=Batch(vary=("seed",), run=_painted_batch))
def painted(ctx, value, seed):
    ctx.progress(1, 1, Preview(data=bytes([seed])))
    return (value + seed,)


def test_a_batched_call_gives_each_job_its_own_preview(tmp_path: Path) -> None:
    """A Batch.run passing one preview per item: each job gets its own; one nobody watches gets none."""
    registry = _registry()
    registry.add(painted)
    executor = Executor(registry, Environment.for_folder(tmp_path))
    events: list[list[Any]] = [[], [], []]
    items = []
    for i, seed in enumerate((1, 2, 3)):
        prompt = {"1": {"class_type": "Constant", "inputs": {"value": 5.0}},
                  "2": {"class_type": "Painted", "inputs": {"value": ["1", 0], "seed": seed}},
                  "3": {"class_type": "Keep", "inputs": {"value": ["2", 0]}}}
        items.append(BatchItem(executor.plan(parse_document(prompt, registry)),
                               JobInfo(id=f"p{seed}", previews=seed != 2), events[i].append, threading.Event()))
    outcomes = run_together(executor, items)
    assert [o.outputs["3"]["value"] for o in outcomes] == [[6.0], [7.0], [8.0]]
    shown = [[e.preview.data if e.preview else None for e in seen if isinstance(e, Progress)] for seen in events]
    assert shown == [[b"\x01"], [None], [b"\x03"]]


def test_a_failing_batch_falls_back_so_only_the_bad_job_fails(tmp_path: Path) -> None:
    CALLS.clear()
    outcomes, events = _together(tmp_path, [4, 13, 6])
    assert [o.status for o in outcomes] == ["succeeded", "failed", "succeeded"]
    assert outcomes[0].outputs["3"]["value"] == [14.0] and outcomes[2].outputs["3"]["value"] == [16.0]
    error = outcomes[1].error
    assert error is not None and error.node_type == "Noisy" and error.input_name == "seed"
    assert "unlucky" in error.message
    assert ("batch", [4, 13, 6]) in CALLS and [v for k, v in CALLS if k == "alone"] == [4, 13, 6]
    for seen in events:
        assert any(isinstance(e, NodeMessage) and "runs for this job alone" in e.message for e in seen)
    assert isinstance(events[1][-1], JobFailed) and isinstance(events[0][-1], JobFinished)


def test_an_interrupted_job_leaves_the_batch_and_the_others_finish(tmp_path: Path) -> None:
    registry = _registry()
    executor = Executor(registry, Environment.for_folder(tmp_path))
    stop = threading.Event()
    events: list[list[Any]] = [[], []]

    def interrupting(event: Any) -> None:  # job 2 is cancelled while the batch runs
        events[1].append(event)
        if isinstance(event, Progress):
            stop.set()

    items = [BatchItem(executor.plan(parse_document(_prompt(1), registry)), JobInfo(id="a"), events[0].append,
                       threading.Event()),
             BatchItem(executor.plan(parse_document(_prompt(2), registry)), JobInfo(id="b"), interrupting, stop)]
    outcomes = run_together(executor, items)
    assert [o.status for o in outcomes] == ["succeeded", "interrupted"]
    assert outcomes[0].outputs["3"]["value"] == [11.0]


async def test_cancelling_one_job_of_a_batch_on_the_server_leaves_the_others(aiohttp_client, tmp_path) -> None:
    """Through the real worker and API: the cancelled job ends interrupted, the rest finish alone."""
    from engine.server.app import make_app
    from server_helpers import spin, wait_status

    registry = _registry()
    registry.add(spin)
    client = await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf",
                                           registry=registry))
    busy = await client.post("/prompt", json={"prompt": {
        "1": {"class_type": "Spin", "inputs": {"value": 1.0, "ticks": 100000, "delay": 0.01}},
        "2": {"class_type": "Keep", "inputs": {"value": ["1", 0]}}}})
    busy_id = (await busy.json())["prompt_id"]
    await wait_status(client, busy_id, ("running",))
    ids = []
    for seed in (1, 2, 3):
        prompt = _prompt(seed)
        prompt["2"]["inputs"].update(ticks=200, delay=0.01)
        ids.append((await (await client.post("/prompt", json={"prompt": prompt})).json())["prompt_id"])
    await client.post(f"/api/jobs/{busy_id}/cancel")
    for job_id in ids:  # claimed together
        await wait_status(client, job_id, ("running",))
    r = await client.post(f"/api/jobs/{ids[1]}/cancel")
    assert (await r.json())["interrupting"] is True
    done = [await wait_status(client, job_id, timeout=60) for job_id in ids]
    assert [d["status"] for d in done] == ["succeeded", "interrupted", "succeeded"]
    hist = await (await client.get("/history")).json()
    assert hist[ids[0]]["outputs"]["3"]["value"] == [11.0] and hist[ids[2]]["outputs"]["3"]["value"] == [13.0]


async def test_a_database_error_while_gathering_a_batch_runs_every_job_alone(aiohttp_client, tmp_path) -> None:
    """Claiming the second job of a batch fails (a busy database): the first runs alone, the claimed
    ones go back to the queue, and every job still finishes."""
    from engine.server.app import make_app
    from engine.server.state import STATE
    from server_helpers import spin, wait_status

    registry = _registry()
    registry.add(spin)
    client = await aiohttp_client(make_app(tmp_path / "data", tmp_path / "models", tmp_path / "wf",
                                           registry=registry))
    store = client.app[STATE].store
    claim, claims = store.claim, []

    def flaky_claim(job_id: str) -> Any:  # fault injection into the real store: every second claim fails
        claims.append(job_id)
        if len(claims) % 2 == 0:
            raise RuntimeError("database is locked")
        return claim(job_id)

    store.claim = flaky_claim
    busy = await client.post("/prompt", json={"prompt": {
        "1": {"class_type": "Spin", "inputs": {"value": 1.0, "ticks": 100000, "delay": 0.01}},
        "2": {"class_type": "Keep", "inputs": {"value": ["1", 0]}}}})
    busy_id = (await busy.json())["prompt_id"]
    await wait_status(client, busy_id, ("running",))
    ids = [(await (await client.post("/prompt", json={"prompt": _prompt(seed)})).json())["prompt_id"]
           for seed in (1, 2, 3)]
    await client.post(f"/api/jobs/{busy_id}/cancel")
    done = [await wait_status(client, job_id, timeout=60) for job_id in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 3
    hist = await (await client.get("/history")).json()
    assert [hist[i]["outputs"]["3"]["value"] for i in ids] == [[11.0], [12.0], [13.0]]
    assert len(claims) >= 2  # the failure did happen


# -- the server, with the tiny SD1 checkpoint -------------------------------------------------

SEEDS = (3, 4, 5)
#: The last job has its own prompt, longer than 77 tokens (a 154-token context): it still shares
#: the sampler batch (per-job conditioning, one network call per token count).
TEXTS = ("a lighthouse", "a lighthouse", ", ".join(["a red boat on a calm sea at dawn"] * 12))


def _txt2img(ckpt: str, seed: int, steps: int = 3, prefix: str = "batch", text: str = "a lighthouse") -> dict[str, Any]:
    def node(cls: str, **inputs: Any) -> dict[str, Any]:
        return {"class_type": cls, "inputs": inputs}

    return {
        "4": node("CheckpointLoaderSimple", ckpt_name=ckpt),
        "5": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "6": node("CLIPTextEncode", text=text, clip=["4", 1]),
        "7": node("CLIPTextEncode", text="", clip=["4", 1]),
        "3": node("KSampler", model=["4", 0], seed=seed, steps=steps, cfg=5.0, sampler_name="euler_ancestral",
                  scheduler="normal", positive=["6", 0], negative=["7", 0], latent_image=["5", 0], denoise=1.0),
        "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": node("SaveImage", images=["8", 0], filename_prefix=prefix),
    }


@pytest.fixture
def node_registry() -> Registry:
    """The real node library plus the test's Spin node (keeps the worker busy)."""
    import stub_nodes
    from server_helpers import spin

    registry = Registry()
    registry.load_entry_points()
    for spec in (spin, stub_nodes.format_number, stub_nodes.show):
        registry.add(spec)
    return registry


async def test_queued_jobs_differing_in_seed_run_as_one_batch(aiohttp_client, tmp_path, tiny_models_dir,
                                                              node_registry) -> None:
    from engine.server.app import make_app
    from server_helpers import wait_status

    import tiny_models

    ckpt = tiny_models.checkpoint_name("sd1")
    client = await aiohttp_client(make_app(tmp_path / "data", tiny_models_dir, tmp_path / "wf",
                                           registry=node_registry))
    ws = await client.ws_connect("/ws?clientId=b&protocol=kiln&encoding=msgpack")  # previews inside the event
    busy = await client.post("/prompt", json={"client_id": "b", "prompt": {
        "1": {"class_type": "Spin", "inputs": {"value": 1.0, "ticks": 100000, "delay": 0.01}},
        "2": {"class_type": "Format", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"text": ["2", 0]}}}})
    busy_id = (await busy.json())["prompt_id"]
    await wait_status(client, busy_id, ("running",))
    ids = []
    for seed, text in zip(SEEDS, TEXTS):
        r = await client.post("/prompt", json={"client_id": "b", "prompt": _txt2img(ckpt, seed, text=text),
                                               "extra_data": {"preview_method": "auto"}})
        ids.append((await r.json())["prompt_id"])
    r = await client.post("/prompt", json={"client_id": "b", "prompt": _txt2img(ckpt, 3, steps=2, prefix="other")})
    other = (await r.json())["prompt_id"]
    await client.post(f"/api/jobs/{busy_id}/cancel")
    for job_id in [*ids, other]:
        assert (await wait_status(client, job_id, timeout=300))["status"] == "succeeded"

    events: dict[str, list[dict]] = {}
    while True:  # every event up to the last job's end
        msg = msgpack.unpackb(await asyncio.wait_for(ws.receive_bytes(), 30), raw=False)
        events.setdefault(msg.get("job_id"), []).append(msg)
        if msg.get("type") == "job_finished" and msg.get("job_id") == other:
            break
    await ws.close()

    files, previews = set(), []
    for job_id in ids:
        seen = [e["type"] for e in events[job_id]]
        assert seen[0] == "job_started" and seen[-1] == "job_finished" and "progress" in seen
        notes = [e["message"] for e in events[job_id] if e["type"] == "node_message"]
        assert any("one batch of 3 jobs" in n for n in notes), notes  # it did run as one batch
        # Each job of the batch gets live previews of its own images, not only the first job.
        steps = [e for e in events[job_id] if e["type"] == "progress" and e["node_id"] == "3"]
        assert steps and all(e.get("preview") for e in steps), steps
        with Image.open(io.BytesIO(steps[-1]["preview"]["data"])) as im:
            previews.append(np.asarray(im.convert("RGB"), dtype=np.int16))
        executed = [e for e in events[job_id] if e["type"] == "node_finished" and e["ui"]]
        assert [e["node_id"] for e in executed] == ["9"]
        hist = (await (await client.get(f"/history/{job_id}")).json())[job_id]
        assert hist["status"]["status_str"] == "success"
        files.add(hist["outputs"]["9"]["images"][0]["filename"])
    assert len(files) == 3  # each job its own file
    for a in range(3):  # the seeds differ, so do the previews: each shows its own job's latent
        for b in range(a + 1, 3):
            assert np.abs(previews[a] - previews[b]).max() > 10, (a, b)
    assert not any(e["type"] == "node_message" and "batch" in e["message"] for e in events[other])

    # Each image equals the same job run alone (a fresh executor, nothing shared with the server).
    from engine.context import Paths

    env = Environment(paths=Paths.under(tmp_path / "alone", models=tiny_models_dir),
                      models=node_registry.make_model_host("cpu", None))
    alone = Executor(node_registry, env)
    images = []
    for seed, text, job_id in zip(SEEDS, TEXTS, ids):
        hist = (await (await client.get(f"/history/{job_id}")).json())[job_id]
        with Image.open(tmp_path / "data" / "output" / hist["outputs"]["9"]["images"][0]["filename"]) as png:
            assert json.loads(png.info["prompt"])["3"]["inputs"]["seed"] == seed  # its own workflow inside
            saved = np.asarray(png.convert("RGB"), dtype=np.int16)
        outcome = alone.run(parse_document(_txt2img(ckpt, seed, text=text), node_registry))
        single = (outcome.results["8"][0][0].numpy() * 255).round().clip(0, 255).astype(np.int16)
        assert np.abs(saved - single).max() <= 1, f"seed {seed}"
        images.append(saved)
    assert np.abs(images[0] - images[1]).max() > 10  # the seeds were honoured
    env.models.unload_all(collect=False)


# -- KSampler's declaration, node level --------------------------------------------------------

def test_ksampler_batch_equals_each_jobs_single_run_and_declines_inexact_cases(tiny_env) -> None:
    import torch

    import tiny_models
    from node_call import call
    from nodes import latent as latent_nodes
    from nodes import loaders, sampling, text

    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    pos = call(text.clip_text_encode, tiny_env, text="a castle", clip=clip)[0]
    neg = call(text.clip_text_encode, tiny_env, text="fog", clip=clip)[0]
    empty = {"samples": torch.zeros(2, 4, 8, 8)}  # two images per job: seeds s and s + 1
    shared = dict(model=model, steps=3, cfg=5.0, scheduler="normal", positive=pos, negative=neg, denoise=1.0)
    ctx = _ctx(tiny_env)

    def check(sampler: str, latents: list[dict], seeds: list[int]) -> None:
        outs = sampling.ksampler.batch.run(ctx, [{"seed": s, "latent_image": lat} for s, lat in zip(seeds, latents)],
                                           sampler_name=sampler, **shared)
        assert outs is not None and len(outs) == len(seeds)
        for seed, lat, (out,) in zip(seeds, latents, outs):
            single = call(sampling.ksampler, tiny_env, seed=seed, sampler_name=sampler, latent_image=lat, **shared)[0]
            assert set(out) == set(single) and out["samples"].shape == (2, 4, 8, 8)
            assert torch.allclose(out["samples"], single["samples"], atol=1e-4), \
                (out["samples"] - single["samples"]).abs().max()

    check("euler_ancestral", [empty] * 3, [7, 20, 31])  # txt2img: the jobs share one latent
    encoded = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    noised = [call(latent_nodes.add_noise, tiny_env, model=model, latent=encoded, strength=0.6, seed=s)[0]
              for s in (1, 2)]
    check("euler", noised, [5, 6])  # img2img: each job's own AddNoise latent
    items = [{"seed": 1, "latent_image": lat} for lat in noised]
    assert sampling.ksampler.batch.run(ctx, items, sampler_name="dpm_adaptive", **shared) is None
    other = dict(noised[1], strength=0.5)
    assert sampling.ksampler.batch.run(ctx, [items[0], {"seed": 2, "latent_image": other}], sampler_name="euler",
                                       **shared) is None  # another strength: another schedule
    assert sampling.ksampler.batch.run(ctx, [{"seed": 1, "latent_image": empty}, {"seed": 2, "latent_image": encoded}],
                                       sampler_name="euler", **shared) is None  # empty vs encoded start differently


def test_img2img_jobs_differing_in_seed_batch_through_addnoise(tiny_env) -> None:
    """The img2img workflow (AddNoise owns a seed, KSampler another): queued with new seeds, one batch."""
    from engine.registry import default_registry
    from engine.workflow import load

    import tiny_models
    from nodes.sample_image import draw_landscape

    registry = default_registry()
    draw_landscape(64, 64).save(tiny_env.paths.input.root / "init.png")
    base = load(Path(__file__).parents[1] / "workflows" / "img2img.json").with_overrides(
        {"checkpoint": tiny_models.checkpoint_name("sd1"), "image": "init.png", "width": 64, "height": 64,
         "steps": 4, "strength": 0.6})
    jobs = [base.with_overrides({"seed": seed}) for seed in (11, 12)]
    executor = Executor(registry, tiny_env)
    events: list[list[Any]] = [[], []]
    items = [BatchItem(executor.plan(wf), JobInfo(id=f"j{i}"), events[i].append, threading.Event())
             for i, wf in enumerate(jobs)]
    assert batch_key(items[0].plan) == batch_key(items[1].plan)
    outcomes = run_together(executor, items)
    decode = next(i for i, n in base.nodes.items() if n.type == "VAEDecode")
    alone = Executor(registry, tiny_env)  # its own cache: nothing of the batch is reused
    for wf, outcome, seen in zip(jobs, outcomes, events):
        assert outcome.status == "succeeded", outcome.error
        notes = [e.message for e in seen if isinstance(e, NodeMessage)]
        assert sum("one batch of 2 jobs" in n for n in notes) == 3, notes  # AddNoise, KSampler, VAEDecode
        single = alone.run(wf)
        diff = (outcome.results[decode][0] - single.results[decode][0]).abs().max().item()
        assert diff * 255 <= 1.0, diff


def _ctx(env: Environment) -> Any:
    from engine.context import NodeContext

    return NodeContext(env=env, job=JobInfo(id="t"), node_id="3", node_type="KSampler",
                       _progress=lambda v, m, p=None: None, _is_interrupted=lambda: False, _message=lambda t: None)


def test_flux_ksampler_batch_equals_single_runs() -> None:
    """Flow models batch as well: txt2img and AddNoise img2img on the tiny FLUX [dev]."""
    import torch

    from nodes.latent import add_noise
    from nodes.sampling import ksampler
    from test_flux import Recorder, _embeds, _init_raw, _model  # the FLUX tests' tiny model and prompt

    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    model = _model("dev")
    shared = dict(model=model, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal", positive=cond,
                  negative=cond, denoise=1.0)
    noised = [add_noise(Recorder().ctx, model, {"samples": _init_raw()}, strength=0.7, seed=s)[0] for s in (1, 2)]
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    for latents in (noised, [empty, empty]):
        outs = ksampler.batch.run(Recorder().ctx, [{"seed": s, "latent_image": lat} for s, lat in zip((1, 2), latents)],
                                  **shared)
        assert outs is not None
        for seed, lat, (out,) in zip((1, 2), latents, outs):
            single = ksampler(Recorder().ctx, seed=seed, latent_image=lat, **shared)[0]["samples"]
            assert torch.allclose(out["samples"], single, atol=1e-4)
        assert not torch.allclose(outs[0][0]["samples"], outs[1][0]["samples"])
