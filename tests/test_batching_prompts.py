"""Cross-job batching of jobs that differ in their prompts and in their input images.

Node level: KSampler's batched run with each job's own positive/negative equals each
job's single run (SD1, SDXL, FLUX [dev] with its own guidance per job), and the
per-job conditioning is really used (same seed, other prompt: another image);
prompts of different token counts (a long prompt, a negative longer than its
positive, a shorter T5 context) share the batch with one network call per token
count (counted). Executor level, with the shipped img2img workflow: two jobs with
other prompts and other input images have one batch key and sample as one batch
of 2, each result equal to its single run; a long prompt among short ones still
samples as one batch of 3 with the same results as alone.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.batching import BatchItem, batch_key, per_job_nodes, run_together
from engine.context import Environment, JobInfo, NodeContext
from engine.events import NodeMessage
from engine.executor import Executor

#: A batched job against its own run, on latents of magnitude ~1-3: float32 matmuls over a batch of 8 rows
#: and of 4 round differently (by CPU kind too), and cfg 5 over 3 steps multiplies that to ~2e-4 on the
#: tiny SDXL; far below a pixel's 1/255 and the 1e-2 by which another prompt moves the latent
BATCH_TOL = 1e-3
LONG = ", ".join(["a very long prompt about a small red house by a lake"] * 12)  # > 77 tokens


def _ctx(env: Environment | None, previews: list | None = None) -> NodeContext:
    """A KSampler's context; ``previews`` (when given) receives each progress report's preview(s)."""
    def progress(v: int, m: int, p: Any = None) -> None:
        if previews is not None:
            previews.append(p)

    return NodeContext(env=env, job=JobInfo(id="t"), node_id="3", node_type="KSampler",
                       _progress=progress, _is_interrupted=lambda: False, _message=lambda t: None)


def _pixels(preview: Any) -> "np.ndarray":
    with Image.open(io.BytesIO(preview.data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_ksampler_batch_gives_each_job_its_own_prompts(tiny_env, variant: str) -> None:
    import torch

    import tiny_models
    from node_call import call
    from nodes import loaders, sampling, text

    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tiny_models.checkpoint_name(variant))

    def encode(prompt: str) -> list:
        return call(text.clip_text_encode, tiny_env, text=prompt, clip=clip)[0]

    prompts = [(encode("a castle"), encode("fog")), (encode("a red boat on the sea"), encode("blurry"))]
    empty = {"samples": torch.zeros(2, 4, 8, 8)}  # two images per job
    shared = dict(model=model, steps=3, cfg=5.0, sampler_name="euler_ancestral", scheduler="normal", denoise=1.0)
    items = [{"seed": 7, "latent_image": empty, "positive": p, "negative": n} for p, n in prompts]
    outs = sampling.ksampler.batch.run(_ctx(tiny_env), items, **shared)
    assert outs is not None and len(outs) == 2
    for item, (out,) in zip(items, outs):
        single = call(sampling.ksampler, tiny_env, **item, **shared)[0]["samples"]
        assert out["samples"].shape == single.shape == (2, 4, 8, 8)
        assert torch.allclose(out["samples"], single, atol=BATCH_TOL), (out["samples"] - single).abs().max()
    # Same seed, other prompts: the per-job conditioning was used, not the first job's for all.
    assert (outs[0][0]["samples"] - outs[1][0]["samples"]).abs().max() > 1e-2

    # A prompt from a text encoder of another width cannot share the batch (nor run alone): decline.
    import torch as _torch

    narrow = [[_torch.zeros(1, 77, 7), {}]]
    assert sampling.ksampler.batch.run(_ctx(tiny_env), [items[0], dict(items[1], positive=narrow)], **shared) is None


class _Calls:
    """Counts the network's forward calls (rows, context tokens) while installed."""

    def __init__(self, model: Any) -> None:
        self.seen: list[tuple[int, int]] = []
        self.net = model.peek()

    def __enter__(self) -> "_Calls":
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))  # UNet / FLUX
            self.seen.append((x.shape[0], kwargs["encoder_hidden_states"].shape[1]))

        self.handle = self.net.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_prompts_of_other_token_counts_share_the_batch(tiny_env, variant: str) -> None:
    """A positive longer than one 77-token window (its context 154 tokens), and a negative longer than
    its positive: the batch makes one network call per token count, short-prompt jobs together, and
    each job equals its single run (where its positive and negative are matched as always)."""
    import torch

    import tiny_models
    from node_call import call
    from nodes import loaders, sampling, text

    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tiny_models.checkpoint_name(variant))

    def encode(prompt: str) -> list:
        return call(text.clip_text_encode, tiny_env, text=prompt, clip=clip)[0]

    short, long_ = encode("a castle"), encode(LONG)
    short_len, long_len = short[0][0].shape[1], long_[0][0].shape[1]
    assert long_len > short_len
    prompts = [(short, encode("fog")), (long_, encode("blurry")), (encode("a red boat"), long_),
               (encode("a lake"), encode("rain"))]
    empty = {"samples": torch.zeros(2, 4, 8, 8)}  # two images per job
    shared = dict(model=model, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    items = [{"seed": 7, "latent_image": empty, "positive": p, "negative": n} for p, n in prompts]
    shown: list[Any] = []
    with _Calls(model) as calls:
        outs = sampling.ksampler.batch.run(_ctx(tiny_env, shown), items, **shared)
    assert outs is not None and len(outs) == 4
    # Per step one call for the two short jobs and one for the two long ones (2 sides x 2 images each),
    # not one per job: the batch did not fall back to per-job sampling.
    assert sorted(calls.seen) == sorted([(8, short_len), (8, long_len)] * 3), calls.seen
    singles = []
    assert len(shown) == 3 and all(len(p) == 4 for p in shown)  # each step: one preview per job
    for j, (item, (out,)) in enumerate(zip(items, outs)):
        alone: list[Any] = []
        single = sampling.ksampler.fn(_ctx(tiny_env, alone), **item, **shared)[0]["samples"]
        assert torch.allclose(out["samples"], single, atol=BATCH_TOL), (out["samples"] - single).abs().max()
        singles.append(single)
        # The job's preview shows its own first image: the one its single run previews.
        assert np.abs(_pixels(shown[-1][j]) - _pixels(alone[-1])).max() <= 3, j
    for k in range(1, 4):  # same seed, other prompts: each job's own conditioning was used
        assert (singles[0] - singles[k]).abs().max() > 1e-2


def test_sdxl_batch_keeps_each_jobs_size_conditioning(tiny_env) -> None:
    """SDXL's pooled text and size ids are per job: the other job's target size changes only its images."""
    import torch

    import tiny_models
    from node_call import call
    from nodes import loaders, sampling, text

    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tiny_models.checkpoint_name("sdxl"))

    def encode(prompt: str, size: int) -> list:
        return call(text.clip_text_encode_sdxl, tiny_env, clip=clip, width=size, height=size, crop_w=0,
                    crop_h=0, target_width=size, target_height=size, text_g=prompt, text_l=prompt)[0]

    neg = encode("", 1024)
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    shared = dict(model=model, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    items = [{"seed": 3, "latent_image": empty, "positive": encode("a hill", size), "negative": neg}
             for size in (1024, 512)]
    outs = sampling.ksampler.batch.run(_ctx(tiny_env), items, **shared)
    assert outs is not None
    singles = [call(sampling.ksampler, tiny_env, **item, **shared)[0]["samples"] for item in items]
    for (out,), single in zip(outs, singles):
        assert torch.allclose(out["samples"], single, atol=BATCH_TOL), (out["samples"] - single).abs().max()
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # the size ids matter, so they were per job


def test_flux_batch_gives_each_job_its_own_prompt_and_guidance() -> None:
    import torch

    from nodes.sampling import ksampler
    from test_flux import Recorder, _embeds, _model

    embeds, pooled = _embeds("dev")
    g = torch.Generator().manual_seed(1)
    other = [[embeds + 0.5 * torch.randn(embeds.shape, generator=g),
              {"pooled_output": pooled + 0.5 * torch.randn(pooled.shape, generator=g), "guidance": 2.0}]]
    conds = [[[embeds, {"pooled_output": pooled, "guidance": 3.5}]], other]
    model = _model("dev")
    shared = dict(model=model, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    items = [{"seed": 5, "latent_image": empty, "positive": c, "negative": c} for c in conds]
    outs = ksampler.batch.run(Recorder().ctx, items, **shared)
    assert outs is not None
    for item, (out,) in zip(items, outs):
        single = ksampler(Recorder().ctx, **item, **shared)[0]["samples"]
        assert torch.allclose(out["samples"], single, atol=BATCH_TOL), (out["samples"] - single).abs().max()
    assert (outs[0][0]["samples"] - outs[1][0]["samples"]).abs().max() > 1e-2

    # A T5 context of another length (Kiln pads to 512, another encoder may not): joint attention
    # over padded tokens would change the image, so the batch calls the network once per length.
    cut = [[other[0][0][:, :256], other[0][1]]]
    items = [items[0], dict(items[1], positive=cut, negative=cut), dict(items[0], seed=6)]
    with _Calls(model) as calls:
        outs = ksampler.batch.run(Recorder().ctx, items, **shared)
    assert outs is not None
    assert sorted(calls.seen) == sorted([(2, 512), (1, 256)] * 4), calls.seen  # cfg 1: positives only
    for item, (out,) in zip(items, outs):
        single = ksampler(Recorder().ctx, **item, **shared)[0]["samples"]
        assert torch.allclose(out["samples"], single, atol=BATCH_TOL), (out["samples"] - single).abs().max()


# -- executor level, the shipped img2img workflow ------------------------------------------------

def _img2img_jobs(env: Environment, jobs: list[dict[str, Any]]) -> list:
    from engine.workflow import load

    import tiny_models
    from nodes.sample_image import draw_landscape

    draw_landscape(64, 64).save(env.paths.input.root / "a.png")
    draw_landscape(64, 64).transpose(0).rotate(90).save(env.paths.input.root / "b.png")  # another image
    base = load(Path(__file__).parents[1] / "workflows" / "img2img.json").with_overrides(
        {"checkpoint": tiny_models.checkpoint_name("sd1"), "width": 64, "height": 64, "steps": 4, "strength": 0.6,
         "seed": 11, "image": "a.png"})
    return [base.with_overrides(job) for job in jobs]


def _run_and_compare(env: Environment, workflows: list) -> list[list[str]]:
    """Run the jobs together; each must equal its single run within 1/255. Returns each job's messages."""
    from engine.registry import default_registry

    registry = default_registry()
    executor = Executor(registry, env)
    events: list[list[Any]] = [[] for _ in workflows]
    items = [BatchItem(executor.plan(wf), JobInfo(id=f"j{i}"), events[i].append, threading.Event())
             for i, wf in enumerate(workflows)]
    assert batch_key(items[0].plan) == batch_key(items[1].plan) is not None
    outcomes = run_together(executor, items)
    decode = next(i for i, n in workflows[0].nodes.items() if n.type == "VAEDecode")
    alone = Executor(registry, env)  # its own cache: nothing of the batch is reused
    images = []
    for wf, outcome in zip(workflows, outcomes):
        assert outcome.status == "succeeded", outcome.error
        single = alone.run(wf).results[decode][0]
        diff = (outcome.results[decode][0] - single).abs().max().item()
        assert diff * 255 <= 1.0, diff
        images.append(single)
    for other in images[1:]:
        assert (images[0] - other).abs().max() > 2 / 255  # the jobs really differ
    return [[f"{e.node_type}: {e.message}" for e in seen if isinstance(e, NodeMessage)] for seen in events]


def test_img2img_jobs_with_other_prompts_and_images_sample_as_one_batch(tiny_env) -> None:
    workflows = _img2img_jobs(tiny_env, [{"prompt": "a lake at dawn", "negative": "fog", "image": "a.png"},
                                         {"prompt": "a desert road", "negative": "rain", "image": "b.png"}])
    for notes in _run_and_compare(tiny_env, workflows):
        assert [n.split(":")[0] for n in notes if "one batch of 2 jobs" in n] == ["AddNoise", "KSampler", "VAEDecode"]


def test_a_prompt_of_another_token_count_still_samples_in_the_batch(tiny_env) -> None:
    """One long prompt (154 tokens) among short ones no longer sends the whole group back to per-job
    sampling: the sampler still runs as one batch of 3, and every job equals its single run."""
    workflows = _img2img_jobs(tiny_env, [{"prompt": "a lake at dawn", "image": "a.png"},
                                         {"prompt": LONG, "image": "a.png"},
                                         {"prompt": "a desert road", "negative": LONG, "image": "a.png"}])
    for notes in _run_and_compare(tiny_env, workflows):
        batched = [n.split(":")[0] for n in notes if "one batch of 3 jobs" in n]
        assert batched == ["KSampler", "VAEDecode"], notes  # AddNoise is shared (same image and seed)


def test_only_what_feeds_per_job_inputs_may_differ(tiny_env) -> None:
    """Prompt encoders and image loading may differ between jobs of one batch; the sampler's settings
    and the image size may not."""
    from engine.registry import default_registry

    registry = default_registry()
    executor = Executor(registry, tiny_env)
    workflows = _img2img_jobs(tiny_env, [{"prompt": "a lake"}, {"prompt": "a road", "image": "b.png"},
                                         {"steps": 5}, {"width": 128}])
    plans = [executor.plan(wf) for wf in workflows]
    free = {plans[0].nodes[n].spec.type for n in per_job_nodes(plans[0])}
    assert free == {"CLIPTextEncode", "LoadImage", "ImageResize", "VAEEncode", "RepeatLatentBatch"}
    assert batch_key(plans[0]) == batch_key(plans[1])
    assert batch_key(plans[0]) != batch_key(plans[2])  # the sampler's settings
    assert batch_key(plans[0]) != batch_key(plans[3])  # ImageResize's size: latents of another shape


def test_images_of_other_sizes_not_resized_to_one_do_not_group(tiny_env) -> None:
    """ComfyUI's image2image shape (LoadImage straight into VAEEncode): the latent's size is the
    file's, so the key holds the size LoadImage's probe reads. Another picture of the same size
    groups; one of another size does not (it could not share the sampler batch, and grouping it
    would only hold the first job back until the last one is done)."""
    import tiny_models
    from engine.formats import parse_document
    from engine.registry import default_registry
    from nodes.sample_image import draw_landscape

    draw_landscape(64, 64).save(tiny_env.paths.input.root / "a.png")
    draw_landscape(64, 64).rotate(90).save(tiny_env.paths.input.root / "b.png")
    draw_landscape(96, 64).save(tiny_env.paths.input.root / "wide.png")
    registry = default_registry()
    executor = Executor(registry, tiny_env)

    def key(image: str, env: Environment | None = tiny_env) -> str | None:
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_models.checkpoint_name("sd1")}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image}},
            "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lake", "clip": ["1", 1]}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 1, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["3", 0], "denoise": 0.6}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "k"}}}
        return batch_key(executor.plan(parse_document(prompt, registry)), env)

    assert key("a.png") == key("b.png") is not None
    assert key("a.png") != key("wide.png")
    assert key("a.png", None) == key("wide.png", None)  # what the size read from the file decides
