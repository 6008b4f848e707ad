"""ComfyUI's custom-sampling nodes and KSamplerAdvanced on tiny random-weight models.

The claims: a custom-sampling graph (RandomNoise + CFGGuider + KSamplerSelect +
BasicScheduler -> SamplerCustomAdvanced) gives KSampler's result with the same
settings; KSamplerAdvanced cut in two (leftover noise, then add_noise disabled) gives
the one-run result; the sigma nodes give the lists worked out by hand; bad input
names the node's input. Each comparison is also shown to be able to fail (a changed
setting changes the result).
"""
from __future__ import annotations

import asyncio
import math

import pytest
import torch

from engine.context import NodeError
from nodes import custom_sampling as cs
from nodes.sampling import ksampler
from test_sampling import PIXEL_TOL, Recorder, Tiny, sd1  # noqa: F401 (sd1 is a fixture)


def _custom(tiny: Tiny, *, seed: int, steps: int, cfg: float, sampler: str, scheduler: str, latent: dict,
            denoise: float = 1.0, noise=None, rec: Recorder | None = None) -> tuple[dict, dict]:
    rec = rec or Recorder()
    ctx = rec.ctx
    noise = noise if noise is not None else cs.random_noise(ctx, seed)[0]
    guider, = cs.cfg_guider(ctx, tiny.model, tiny.pos, tiny.neg, cfg)
    spec, = cs.ksampler_select(ctx, sampler)
    sigmas, = cs.basic_scheduler(ctx, tiny.model, scheduler, steps, denoise)
    return cs.sampler_custom_advanced(ctx, noise, guider, spec, sigmas, latent)


def _pixels_close(tiny: Tiny, a: torch.Tensor, b: torch.Tensor) -> float:
    return (tiny.decode(a) - tiny.decode(b)).abs().max().item()


# -- parity with KSampler -------------------------------------------------------------------

@pytest.mark.parametrize("sampler,scheduler,denoise,empty", [
    ("euler", "normal", 1.0, True),      # text to image on KSampler's (diffusers') grid
    ("euler", "normal", 0.6, False),     # ComfyUI's denoise rule on an encoded latent
    ("euler", "karras", 0.5, False),
    ("euler_ancestral", "normal", 1.0, True),  # the seed's generator keeps feeding the ancestral steps
])
def test_sampler_custom_advanced_equals_ksampler(sd1, sampler, scheduler, denoise, empty):
    latent = {"samples": torch.zeros_like(sd1.init) if empty else sd1.init}
    ref, = ksampler(Recorder().ctx, sd1.model, 5, 8, 7.0, sampler, scheduler, sd1.pos, sd1.neg, latent, denoise)
    out, den = _custom(sd1, seed=5, steps=8, cfg=7.0, sampler=sampler, scheduler=scheduler, latent=latent,
                       denoise=denoise)
    assert out["samples"].shape == ref["samples"].shape
    assert _pixels_close(sd1, out["samples"], ref["samples"]) <= PIXEL_TOL
    assert (out["samples"] - ref["samples"]).abs().max().item() < 1e-3
    # The run ends on sigma 0, so the last clean prediction is the output itself.
    assert torch.allclose(den["samples"], out["samples"], atol=1e-4)
    # Not vacuous: another seed or another cfg gives another image.
    other, _ = _custom(sd1, seed=6, steps=8, cfg=7.0, sampler=sampler, scheduler=scheduler, latent=latent,
                       denoise=denoise)
    assert _pixels_close(sd1, other["samples"], ref["samples"]) > 0.01
    guided, _ = _custom(sd1, seed=5, steps=8, cfg=2.0, sampler=sampler, scheduler=scheduler, latent=latent,
                        denoise=denoise)
    assert _pixels_close(sd1, guided["samples"], ref["samples"]) > 0.01


def test_sampler_custom_equals_sampler_custom_advanced(sd1):
    ctx = Recorder().ctx
    latent = {"samples": sd1.init}
    spec, = cs.ksampler_select(ctx, "heun")
    sigmas, = cs.basic_scheduler(ctx, sd1.model, "karras", 6, 0.7)
    a, _ = cs.sampler_custom(ctx, sd1.model, True, 11, 6.0, sd1.pos, sd1.neg, spec, sigmas, latent)
    b, _ = _custom(sd1, seed=11, steps=6, cfg=6.0, sampler="heun", scheduler="karras", latent=latent, denoise=0.7)
    assert torch.equal(a["samples"], b["samples"])


def test_basic_guider_is_cfg_one_on_the_positive_prompt(sd1):
    ctx = Recorder().ctx
    latent = {"samples": torch.zeros_like(sd1.init)}
    noise, = cs.random_noise(ctx, 3)
    spec, = cs.ksampler_select(ctx, "euler")
    sigmas, = cs.basic_scheduler(ctx, sd1.model, "normal", 5, 1.0)
    basic, = cs.basic_guider(ctx, sd1.model, sd1.pos)
    a, _ = cs.sampler_custom_advanced(ctx, noise, basic, spec, sigmas, latent)
    ref, = ksampler(Recorder().ctx, sd1.model, 3, 5, 1.0, "euler", "normal", sd1.pos, sd1.neg, latent, 1.0)
    assert (a["samples"] - ref["samples"]).abs().max().item() < 1e-3
    cfg, = cs.cfg_guider(ctx, sd1.model, sd1.pos, sd1.neg, 7.0)
    b, _ = cs.sampler_custom_advanced(ctx, noise, cfg, spec, sigmas, latent)
    assert (a["samples"] - b["samples"]).abs().max().item() > 1e-2


# -- KSamplerAdvanced ----------------------------------------------------------------------

def _advanced(tiny, *, add_noise="enable", seed=9, steps=10, sampler="euler", scheduler="normal", start=0,
              end=10000, leftover="disable", latent=None, rec=None):
    rec = rec or Recorder()
    latent = latent if latent is not None else {"samples": torch.zeros_like(tiny.init)}
    out, = cs.ksampler_advanced(rec.ctx, tiny.model, add_noise, seed, steps, 7.0, sampler, scheduler, tiny.pos,
                                tiny.neg, latent, start, end, leftover)
    return out


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2"])
def test_ksampler_advanced_in_two_halves_equals_one_run(sd1, sampler):
    """One-step methods only: a multistep method loses its history at the cut, and an
    ancestral one reseeds its noise in the second half (both as in ComfyUI)."""
    full = _advanced(sd1, sampler=sampler)
    first = _advanced(sd1, sampler=sampler, end=4, leftover="enable")
    second = _advanced(sd1, sampler=sampler, add_noise="disable", start=4, latent=first)
    assert _pixels_close(sd1, second["samples"], full["samples"]) <= PIXEL_TOL
    assert (second["samples"] - full["samples"]).abs().max().item() < 1e-3
    # Not vacuous: the first half alone still holds its leftover noise.
    assert _pixels_close(sd1, first["samples"], full["samples"]) > 0.05
    # One whole run is KSampler's text to image with the same settings.
    ref, = ksampler(Recorder().ctx, sd1.model, 9, 10, 7.0, sampler, "normal", sd1.pos, sd1.neg,
                    {"samples": torch.zeros_like(sd1.init)}, 1.0)
    assert _pixels_close(sd1, full["samples"], ref["samples"]) <= PIXEL_TOL


def test_ksampler_advanced_stopping_early_without_leftover_noise_ends_on_sigma_zero(sd1):
    rec = Recorder()
    stopped = _advanced(sd1, end=4, leftover="disable", rec=rec)
    assert len(rec.steps) == 4
    leftover = _advanced(sd1, end=4, leftover="enable")
    assert _pixels_close(sd1, stopped["samples"], leftover["samples"]) > 0.01
    # Forced to sigma 0, Euler's last step lands on the model's clean prediction at step 3:
    # the denoised_output of the same four steps run with their leftover noise.
    ctx = Recorder().ctx
    sigmas, = cs.basic_scheduler(ctx, sd1.model, "normal", 10, 1.0)
    high, _ = cs.split_sigmas(ctx, sigmas, 4)
    guider, = cs.cfg_guider(ctx, sd1.model, sd1.pos, sd1.neg, 7.0)
    out, clean = cs.sampler_custom_advanced(ctx, cs.random_noise(ctx, 9)[0], guider, cs.ksampler_select(ctx, "euler")[0],
                                            high, {"samples": torch.zeros_like(sd1.init)})
    assert (out["samples"] - leftover["samples"]).abs().max().item() < 1e-3
    assert (clean["samples"] - stopped["samples"]).abs().max().item() < 1e-3
    rec = Recorder()
    same = _advanced(sd1, start=10, latent={"samples": sd1.init}, rec=rec)
    assert torch.equal(same["samples"], sd1.init) and rec.messages and not rec.steps


# -- the sigma nodes against hand-computed lists ---------------------------------------------

S = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.0])


def test_split_sigmas_by_step():
    high, low = cs.split_sigmas(None, S, 2)
    assert high.tolist() == [10.0, 6.0, 3.0] and low.tolist() == [3.0, 1.0, 0.5, 0.0]
    high, low = cs.split_sigmas(None, S, 0)
    assert high.tolist() == [10.0] and low.tolist() == S.tolist()
    high, low = cs.split_sigmas(None, S, 5)
    assert high.tolist() == S.tolist() and low.tolist() == [0.0]
    with pytest.raises(NodeError) as err:
        cs.split_sigmas(None, S, 6)
    assert err.value.input_name == "step" and "beyond" in str(err.value)


def test_split_sigmas_denoise():
    high, low = cs.split_sigmas_denoise(None, S, 0.4)  # 5 steps * 0.4 = 2 quiet steps
    assert high.tolist() == [10.0, 6.0, 3.0, 1.0] and low.tolist() == [1.0, 0.5, 0.0]
    high, low = cs.split_sigmas_denoise(None, S, 1.0)
    assert high.tolist() == [10.0] and low.tolist() == S.tolist()
    high, low = cs.split_sigmas_denoise(None, S, 0.0)
    assert high.tolist() == S.tolist() and low.tolist() == [0.0]


def test_flip_sigmas():
    flipped, = cs.flip_sigmas(None, S)
    assert flipped.tolist() == pytest.approx([0.0001, 0.5, 1.0, 3.0, 6.0, 10.0])
    assert S[-1].item() == 0.0  # the input is not changed in place
    flipped, = cs.flip_sigmas(None, torch.tensor([2.0, 1.0]))
    assert flipped.tolist() == [1.0, 2.0]


def test_karras_scheduler_by_hand():
    sigmas, = cs.karras_scheduler(None, 4, 10.0, 0.1, 7.0)
    lo, hi = 0.1 ** (1 / 7), 10.0 ** (1 / 7)
    hand = [(hi + k / 3 * (lo - hi)) ** 7 for k in range(4)] + [0.0]
    assert sigmas.tolist() == pytest.approx(hand, rel=1e-6)
    with pytest.raises(NodeError) as err:
        cs.karras_scheduler(None, 4, 10.0, 0.1, 0.0)
    assert err.value.input_name == "rho"


def test_basic_scheduler_is_ksampler_s_grid(sd1):
    from nodes.samplers import schedules
    from nodes.samplers.plan import plan

    config = sd1.model.scheduler_config
    sigmas, = cs.basic_scheduler(None, sd1.model, "karras", 8, 1.0)
    assert sigmas.tolist() == pytest.approx(schedules.diffusers_sigmas(config, "karras", 8).tolist())
    half, = cs.basic_scheduler(None, sd1.model, "normal", 20, 0.5)
    assert len(half) == 21
    p = plan(cs.resolve_sampler("euler"), "normal", config, 20, x0=sd1.init, noise=torch.zeros_like(sd1.init),
             strength=None, denoise=0.5)
    assert half.tolist() == pytest.approx(p.sigmas.tolist())
    empty, = cs.basic_scheduler(None, sd1.model, "normal", 20, 0.0)
    assert len(empty) == 0


# -- noise ------------------------------------------------------------------------------------

def test_disable_noise_starts_from_the_latent_as_it_is(sd1):
    """DisableNoise on a latent already noised by hand gives RandomNoise's run on the clean one."""
    sigmas, = cs.basic_scheduler(None, sd1.model, "normal", 6, 0.5)
    latent = {"samples": sd1.init}
    ref, _ = _custom(sd1, seed=21, steps=6, cfg=7.0, sampler="euler", scheduler="normal", latent=latent, denoise=0.5)
    noise = torch.randn(sd1.init.shape, generator=torch.Generator().manual_seed(21))
    fmt = sd1.model.latent
    noised = {"samples": fmt.from_model(fmt.to_model(sd1.init) + noise * float(sigmas[0]))}
    off, = cs.disable_noise(None)
    out, _ = _custom(sd1, seed=0, steps=6, cfg=7.0, sampler="euler", scheduler="normal", latent=noised,
                     denoise=0.5, noise=off)
    assert (out["samples"] - ref["samples"]).abs().max().item() < 1e-3
    # Not vacuous: on the clean latent DisableNoise only sharpens it, far from the noised run.
    clean, _ = _custom(sd1, seed=0, steps=6, cfg=7.0, sampler="euler", scheduler="normal", latent=latent,
                       denoise=0.5, noise=off)
    assert _pixels_close(sd1, clean["samples"], ref["samples"]) > 0.01


def test_random_noise_follows_batch_index(sd1):
    noise, = cs.random_noise(None, 100)
    drawn, _ = noise.draw(torch.zeros(2, 4, 8, 8), [3, 7])
    for row, k in zip(drawn, (3, 7)):
        own = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(100 + k))
        assert torch.equal(row, own[0])


# -- bad input ----------------------------------------------------------------------------------

def test_bad_input_names_the_input(sd1):
    ctx = Recorder().ctx
    noise, = cs.random_noise(ctx, 1)
    guider, = cs.cfg_guider(ctx, sd1.model, sd1.pos, sd1.neg, 7.0)
    spec, = cs.ksampler_select(ctx, "euler")
    latent = {"samples": sd1.init}
    for bad in (torch.tensor([3.0]), torch.zeros(0)):
        with pytest.raises(NodeError) as err:
            cs.sampler_custom_advanced(ctx, noise, guider, spec, bad, latent)
        assert err.value.input_name == "sigmas" and "at least 2" in str(err.value)
    for bad in (torch.zeros(2, 3), torch.tensor([1.0, float("nan")]), [1.0, 0.0]):
        with pytest.raises(NodeError) as err:
            cs.sampler_custom_advanced(ctx, noise, guider, spec, bad, latent)
        assert err.value.input_name == "sigmas"
    with pytest.raises(NodeError) as err:
        cs.sampler_custom_advanced(ctx, noise, "not a guider", spec, torch.tensor([1.0, 0.0]), latent)
    assert err.value.input_name == "guider"
    with pytest.raises(NodeError) as err:
        cs.sampler_custom_advanced(ctx, noise, guider, spec, torch.tensor([1.0, 0.0]), {"samples": torch.ones(1, 3, 8, 8)})
    assert err.value.input_name == "latent_image" and "channels" in str(err.value)
    # An empty latent of another channel count takes the model's (ComfyUI's rule, for FLUX templates).
    out, _ = cs.sampler_custom_advanced(ctx, noise, guider, spec, torch.tensor([1.0, 0.0]),
                                        {"samples": torch.zeros(1, 16, 8, 8)})
    assert out["samples"].shape == (1, 4, 8, 8)
    with pytest.raises(NodeError) as err:
        cs.ksampler_select(ctx, "nope")
    assert err.value.input_name == "sampler_name"
    with pytest.raises(NodeError) as err:
        cs.ksampler_advanced(ctx, sd1.model, "maybe", 0, 4, 7.0, "euler", "normal", sd1.pos, sd1.neg, latent, 0, 4,
                             "disable")
    assert err.value.input_name == "add_noise"


def test_sigmas_ending_above_zero_leave_noise_for_every_kind_of_stepper(sd1):
    """The high half of a split list runs for diffusers' classes (Euler, Heun, DPM-Solver)
    and Kiln's own steppers alike, and the low half finishes it."""
    ctx = Recorder().ctx
    guider, = cs.cfg_guider(ctx, sd1.model, sd1.pos, sd1.neg, 7.0)
    sigmas, = cs.basic_scheduler(ctx, sd1.model, "karras", 8, 1.0)
    high, low = cs.split_sigmas(ctx, sigmas, 3)
    latent = {"samples": torch.zeros_like(sd1.init)}
    for name in ("euler", "heun", "dpmpp_2m", "ipndm", "euler_ancestral", "lms"):
        spec, = cs.ksampler_select(ctx, name)
        rec = Recorder()
        first, _ = cs.sampler_custom_advanced(rec.ctx, cs.random_noise(ctx, 2)[0], guider, spec, high, latent)
        assert rec.steps and math.isfinite(first["samples"].abs().max().item()), name
        second, _ = cs.sampler_custom_advanced(ctx, cs.disable_noise(ctx)[0], guider, spec, low, first)
        whole, _ = cs.sampler_custom_advanced(ctx, cs.random_noise(ctx, 2)[0], guider, spec, sigmas, latent)
        assert torch.isfinite(second["samples"]).all(), name
        if name in ("euler", "heun"):  # one-step methods: the halves are the whole run
            assert (second["samples"] - whole["samples"]).abs().max().item() < 1e-3, name


# -- a ComfyUI API-format graph through the executor and the server -----------------------------

def _api_prompt(seed: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red barn", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "22": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": 7.0}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "custom", "images": ["8", 0]}},
    }


def _ksampler_prompt(seed: int) -> dict:
    prompt = {k: v for k, v in _api_prompt(seed).items() if k in ("4", "5", "6", "7", "8", "9")}
    prompt["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": seed, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    prompt["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    return prompt


def test_api_format_graph_runs_through_the_executor(tiny_env):
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse

    executor = Executor(default_registry(), tiny_env)
    custom = executor.run(parse(_api_prompt(8)))
    assert custom.status == "succeeded", custom.error and custom.error.message
    plain = executor.run(parse(_ksampler_prompt(8)))
    assert plain.status == "succeeded", plain.error and plain.error.message
    a, b = custom.results["8"][0], plain.results["8"][0]
    assert (a - b).abs().max().item() <= PIXEL_TOL
    other = executor.run(parse(_api_prompt(9)))
    assert (other.results["8"][0] - a).abs().max().item() > 0.01


async def test_api_format_graph_runs_through_the_server(aiohttp_client, tiny_models_dir, tmp_path):
    from engine.server.app import make_app

    client = await aiohttp_client(make_app(tmp_path / "data", tiny_models_dir, tmp_path / "wf"))
    info = await (await client.get("/object_info/SamplerCustomAdvanced")).json()
    node = info["SamplerCustomAdvanced"]
    assert node["input"]["required"]["noise"] == ["NOISE"]
    assert node["output"] == ["LATENT", "LATENT"] and node["output_name"] == ["output", "denoised_output"]
    r = await client.post("/prompt", json={"prompt": _api_prompt(8), "client_id": "t"})
    assert r.status == 200, await r.text()
    prompt_id = (await r.json())["prompt_id"]
    for _ in range(600):
        history = await (await client.get(f"/history/{prompt_id}")).json()
        if prompt_id in history and history[prompt_id]["status"].get("completed"):
            break
        await asyncio.sleep(0.1)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["9"]["images"]
    assert images and images[0]["filename"].startswith("custom")
    r = await client.get("/view", params={"filename": images[0]["filename"], "type": "output"})
    assert r.status == 200 and (await r.read())[:8] == b"\x89PNG\r\n\x1a\n"


# -- issue 15's small nodes ------------------------------------------------------------------------

def test_model_sampling_discrete_sets_what_the_model_predicts():
    """A v-prediction model loaded as epsilon samples as the v model once told 'v_prediction'."""
    import dataclasses

    v = Tiny("sd2-v")
    latent = {"samples": torch.zeros_like(v.init)}
    ref, = ksampler(Recorder().ctx, v.model, 4, 5, 7.0, "euler", "normal", v.pos, v.neg, latent, 1.0)
    wrong = dataclasses.replace(v.model, scheduler_config=dict(v.model.scheduler_config, prediction_type="epsilon"))
    bad, = ksampler(Recorder().ctx, wrong, 4, 5, 7.0, "euler", "normal", v.pos, v.neg, latent, 1.0)
    assert _pixels_close(v, bad["samples"], ref["samples"]) > 0.01
    fixed, = cs.model_sampling_discrete(None, wrong, "v_prediction", False)
    assert wrong.prediction_type == "epsilon" and fixed.prediction_type == "v_prediction"
    good, = ksampler(Recorder().ctx, fixed, 4, 5, 7.0, "euler", "normal", v.pos, v.neg, latent, 1.0)
    assert _pixels_close(v, good["samples"], ref["samples"]) <= PIXEL_TOL
    assert cs.model_sampling_discrete(None, wrong, "x0", False)[0].prediction_type == "sample"
    with pytest.raises(NodeError) as err:
        cs.model_sampling_discrete(None, wrong, "lcm", False)
    assert err.value.input_name == "sampling"


def test_model_sampling_discrete_zsnr_rescales_the_schedule(sd1):
    from nodes.samplers.model_sampling import for_model

    plain = for_model(sd1.model)
    zsnr = for_model(cs.model_sampling_discrete(None, sd1.model, "eps", True)[0])
    assert plain.sigma_max == pytest.approx(14.6146, abs=1e-3)
    # Zero terminal SNR: alpha-bar at the last step is 2^-24 (diffusers' floor), sigma = sqrt((1 - a) / a).
    assert zsnr.sigma_max == pytest.approx(math.sqrt((1 - 2 ** -24) / 2 ** -24), rel=1e-3)
    sigmas, = cs.basic_scheduler(None, cs.model_sampling_discrete(None, sd1.model, "v_prediction", True)[0],
                                 "karras", 4, 0.99)
    # ComfyUI's karras grid (denoise < 1: int(4 / 0.99) = 4 steps) starts at the model's sigma_max.
    assert sigmas[0].item() == pytest.approx(zsnr.sigma_max, rel=1e-4) and len(sigmas) == 5


def test_clip_text_encode_sdxl_refiner(tiny_env):
    from node_call import Called, call
    from nodes import loaders, text
    import tiny_models as tm

    clip = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sdxl"))[1]
    cond = call(text.clip_text_encode_sdxl_refiner, tiny_env, ascore=2.5, width=768, height=512, text="a cat",
                clip=clip)[0]
    plain = call(text.clip_text_encode, tiny_env, Called(), text="a cat", clip=clip)[0]
    (embeds, extra), = cond
    assert torch.equal(embeds, plain[0][0]) and torch.equal(extra["pooled_output"], plain[0][1]["pooled_output"])
    assert (extra["aesthetic_score"], extra["width"], extra["height"]) == (2.5, 768, 512)
    sd1_clip = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))[1]
    with pytest.raises(NodeError) as err:
        call(text.clip_text_encode_sdxl_refiner, tiny_env, ascore=6.0, width=1024, height=1024, text="a",
             clip=sd1_clip)
    assert err.value.input_name == "clip"


# -- CFG++ samplers against the published update written out here ---------------------------------

def _cfgpp_reference(tiny: Tiny, *, seed: int, steps: int, cfg: float, ancestral: bool) -> torch.Tensor:
    """CFG++ Euler (arXiv 2406.08070, ComfyUI's sample_euler[_ancestral]_cfg_pp) driven by hand:
    diffusers' Euler grid and timesteps, one UNet batch [negative, positive] per step,
    x' = denoised + sigma_down * (x - uncond_denoised) / sigma, plus sigma_up of fresh noise."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(dict(tiny.model.scheduler_config))
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.tolist()
    log_sigmas = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt().log().numpy()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=gen) * float(sched.init_noise_sigma)
    unet = tiny.parts["unet"]
    context = torch.cat([tiny.neg[0][0], tiny.pos[0][0]])
    with torch.no_grad():
        for i in range(steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            t = float(sched._sigma_to_t(torch.tensor(s).numpy(), log_sigmas))
            out = unet(torch.cat([x, x]) / math.sqrt(s * s + 1), t, encoder_hidden_states=context).sample
            eps_u, eps_c = out.chunk(2)
            denoised = x - s * (eps_u + cfg * (eps_c - eps_u))
            d = eps_u  # (x - uncond_denoised) / sigma for an epsilon model
            up = 0.0
            if ancestral and s_next > 0:
                up = min(s_next, math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
            x = denoised + d * math.sqrt(s_next ** 2 - up ** 2)
            if up > 0:
                x = x + torch.randn((1, 4, 8, 8), generator=gen) * up
    return x / tiny.model.latent.scale


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "euler_ancestral_cfg_pp"])
def test_cfg_pp_samplers_follow_the_published_update(sd1, sampler):
    latent = {"samples": torch.zeros_like(sd1.init)}
    ours, = ksampler(Recorder().ctx, sd1.model, 12, 6, 1.5, sampler, "normal", sd1.pos, sd1.neg, latent, 1.0)
    ref = _cfgpp_reference(sd1, seed=12, steps=6, cfg=1.5, ancestral=sampler.startswith("euler_ancestral"))
    assert _pixels_close(sd1, ours["samples"], ref) <= PIXEL_TOL
    # Not vacuous: CFG++ is not the plain sampler at the same settings.
    plain_name = sampler.replace("_cfg_pp", "")
    plain, = ksampler(Recorder().ctx, sd1.model, 12, 6, 1.5, plain_name, "normal", sd1.pos, sd1.neg, latent, 1.0)
    assert _pixels_close(sd1, plain["samples"], ref) > 0.01


# -- dpm_adaptive against the exact solution of the probability-flow ODE --------------------------

def _drive(stepper, x: torch.Tensor, data_std: float) -> torch.Tensor:
    """Run a stepper as the loop does, on the ideal denoiser for Gaussian data N(0, c^2):
    D(x, sigma) = x * c^2 / (c^2 + sigma^2) (an epsilon model's output is (x - D) / sigma)."""
    for t in stepper.timesteps:
        sigma = stepper.current_sigma
        denoised = x * data_std ** 2 / (data_std ** 2 + sigma ** 2)
        x = stepper.step((x - denoised) / sigma, t, x).prev_sample
    return x


def test_dpm_adaptive_lands_on_the_exact_ode_solution():
    """For Gaussian data the ODE dx/dsigma = (x - D) / sigma has the closed form
    x(sigma) = x_T * sqrt(c^2 + sigma^2) / sqrt(c^2 + sigma_T^2): the solver, which only
    sees the two ends of the list, must land there (within its error control: a few
    percent at ComfyUI's loose defaults); a tighter tolerance costs more evaluations."""
    from nodes.samplers.adaptive import DPMAdaptive
    from test_sampling import SD15

    c, sigmas = 0.5, torch.tensor([14.6, 7.0, 1.0, 0.03, 0.0])
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    exact = x_t * math.sqrt(c ** 2 + 0.03 ** 2) / math.sqrt(c ** 2 + 14.6 ** 2)
    loose = DPMAdaptive(SD15, sigmas)
    x = _drive(loose, x_t.clone(), c)
    scale = exact.abs().max().item()
    assert (x - exact).abs().max().item() < 0.03 * scale
    assert loose.evaluations % 3 == 0 and loose.evaluations == len(loose.timesteps) > 3
    tight = DPMAdaptive(SD15, sigmas, rtol=0.001, atol=0.0001)
    x = _drive(tight, x_t.clone(), c)
    assert tight.evaluations > loose.evaluations and tight.n_reject > 0
    assert (x - exact).abs().max().item() < 0.03 * scale
    # Not vacuous: stopping at the ends' first step (no solving) is far off.
    assert (x_t - exact).abs().max().item() > 1.0


def test_dpm_adaptive_runs_in_ksampler(sd1):
    rec = Recorder()
    out, = ksampler(rec.ctx, sd1.model, 3, 6, 7.0, "dpm_adaptive", "karras", sd1.pos, sd1.neg,
                    {"samples": torch.zeros_like(sd1.init)}, 1.0)
    assert torch.isfinite(out["samples"]).all()
    assert len(rec.steps) >= 6 and len(rec.steps) % 3 == 0
    assert rec.steps[-1][0] == rec.steps[-1][1] == len(rec.steps)
