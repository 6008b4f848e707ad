"""The shipped workflows, run through the real loaders on tiny checkpoints, against diffusers.

test_sampling.py proves the sampler on handles built around diffusers' modules;
this file closes the loop: workflows/img2img.json and txt2img.json as a user runs
them (single-file checkpoint -> CheckpointLoader, CLIPTextEncode, LoadImage,
VAEEncode, AddNoise, KSampler, VAEDecode) must give diffusers' pipeline's pixels
on the same weights and seed. diffusers samples the VAE posterior with the same
generator as the noise while Kiln encodes to the posterior mean, so the diffusers
side is given Kiln's init latent (its img2img pipeline accepts latents as the image).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import load

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"
SIZE = 64


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def run(registry, env, name: str, **params):
    wf = load(WORKFLOWS / name).with_overrides(params)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def decoded(outcome, node_id: str) -> np.ndarray:
    return outcome.results[node_id][0].numpy()


@pytest.mark.parametrize("variant,sampler", [("sd1", "euler"), ("sd1", "dpmpp_2m"), ("sd1", "euler_ancestral"),
                                             ("sdxl", "euler")])
def test_img2img_workflow_equals_the_diffusers_pipeline(registry, tiny_env, variant, sampler):
    from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline)

    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(tiny_env.paths.input.root / "init.png")
    outcome = run(registry, tiny_env, "img2img.json", checkpoint=tiny_models.checkpoint_name(variant),
                  image="init.png", width=SIZE, height=SIZE, prompt=PROMPT, negative=NEGATIVE, strength=0.6,
                  steps=10, cfg=7.0, sampler=sampler, scheduler="normal", seed=7)
    kiln = decoded(outcome, "9")
    init_latent = outcome.results["6"][0]["samples"]

    cls = StableDiffusionXLImg2ImgPipeline if variant == "sdxl" else StableDiffusionImg2ImgPipeline
    pipe = tiny_models.pipeline(variant, cls=cls)
    scheduler_cls = {"euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler,
                     "dpmpp_2m": DPMSolverMultistepScheduler}[sampler]
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    extra = {"aesthetic_score": 6.0} if variant == "sdxl" else {}
    reference = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init_latent * pipe.vae.config.scaling_factor,
                     strength=0.6, num_inference_steps=10, guidance_scale=7.0, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(7), **extra).images
    assert kiln.shape == reference.shape == (1, SIZE, SIZE, 3)
    assert np.abs(kiln - reference).max() <= 1 / 255
    assert kiln.std() > 0.01  # a real image, not a constant


def test_txt2img_workflow_equals_the_diffusers_pipeline(registry, tiny_env):
    outcome = run(registry, tiny_env, "txt2img.json", checkpoint=tiny_models.checkpoint_name("sd1", "diffusers"),
                  width=SIZE, height=SIZE, prompt=PROMPT, negative=NEGATIVE, steps=8, cfg=6.0,
                  sampler="euler", scheduler="normal", seed=3)
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_models.pipeline("sd1")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=8,
                     guidance_scale=6.0, output_type="np", generator=torch.Generator("cpu").manual_seed(3)).images
    assert np.abs(decoded(outcome, "6") - reference).max() <= 1 / 255


def test_strength_sweep_and_refine_loop_run_and_reuse_shared_work(registry, tiny_env):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(tiny_env.paths.input.root / "init.png")
    common = dict(checkpoint=tiny_models.checkpoint_name("sd1"), image="init.png", steps=4, width=SIZE,
                  height=SIZE)
    executor = Executor(registry, tiny_env)
    sweep = load(WORKFLOWS / "strength-sweep.json").with_overrides(common)
    events = []
    outcome = executor.run(sweep, on_event=events.append)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    saved = outcome.outputs["31"]["images"][0]
    with Image.open(tiny_env.paths.output.resolve(saved["filename"], saved.get("subfolder", ""))) as grid:
        assert grid.width > 5 * SIZE and grid.height > SIZE  # five labelled cells in a row
    # four samplers ran; the image, the encode and both prompts ran once each
    ran = [e.node_id for e in events if e.type == "node_started"]
    assert sorted(ran).count("6") == 1 and len([n for n in ran if n in ("11", "14", "17", "20")]) == 4

    refine = load(WORKFLOWS / "refine-loop.json").with_overrides(common)
    events.clear()
    outcome = executor.run(refine, on_event=events.append)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    cached = [n for e in events if e.type == "nodes_cached" for n in e.node_ids]
    assert {"1", "2", "3", "6"} <= set(cached)  # shared with the sweep: served from the cache
    ran = {e.node_id for e in events if e.type == "node_started"}
    assert not ran & {"4", "5"}  # the encode is cached, so the image it came from is not even loaded
    first, second = decoded(outcome, "11"), decoded(outcome, "13")
    assert first.shape == second.shape and np.abs(first - second).max() > 0  # the second pass changed it


def test_a_new_seed_reruns_only_noise_and_what_follows(registry, tiny_env):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(tiny_env.paths.input.root / "init.png")
    executor = Executor(registry, tiny_env)
    base = load(WORKFLOWS / "img2img.json").with_overrides(
        dict(checkpoint=tiny_models.checkpoint_name("sd1"), image="init.png", steps=4, width=SIZE, height=SIZE))
    assert executor.run(base).status == "succeeded"
    events = []
    outcome = executor.run(base.with_overrides({"seed": 1234}), on_event=events.append)
    ran = {e.node_id for e in events if e.type == "node_started"}
    assert outcome.status == "succeeded" and ran == {"7", "8", "9", "10"}


def test_make_run_demo_on_a_fresh_folder(tmp_path):
    """`make run` = `python -m nodes.demo run`: no checkpoint, so a random demo one, said plainly."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "nodes.demo", "run", "--models", "models", "--input", "input",
                           "--output", "output", "--set", "steps=3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" in proc.stderr and "noise, not art" in proc.stderr
    saved = [Path(line) for line in proc.stdout.split()]
    assert len(saved) == 1 and saved[0].is_file()
    with Image.open(saved[0]) as img:
        embedded = json.loads(img.text["kiln_workflow"])
    assert embedded["nodes"]["1"]["inputs"]["ckpt_name"] == "kiln-demo-random-weights.safetensors"
    assert (tmp_path / "input" / "sample.png").is_file()


def test_demo_prefers_a_real_checkpoint(tmp_path, tiny_models_dir):
    from nodes.demo import choose_checkpoint

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "mine.safetensors").symlink_to(tiny_models_dir / "checkpoints" / "tiny-sd1.safetensors")
    assert choose_checkpoint(models) == ("mine.safetensors", False)
    assert not (models / "checkpoints" / "kiln-demo-random-weights.safetensors").exists()
    # The demo picks among exactly the names CheckpointLoader offers (one listing, not two).
    from engine.context import Environment, Paths
    from nodes.loaders import checkpoint_loader

    (models / "checkpoints" / "a-first.ckpt").symlink_to(models / "checkpoints" / "mine.safetensors")
    env = Environment(paths=Paths.under(tmp_path / "data", models=models))
    offered = checkpoint_loader.inputs[0].choice_list(env)
    assert offered == ["a-first.ckpt", "mine.safetensors"]
    assert choose_checkpoint(models) == (offered[0], False)
