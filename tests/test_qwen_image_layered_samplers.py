"""Every sampler node samples Qwen-Image-Layered's layered latents as KSampler does (one shared way in,
nodes.latent_layers.fold_for_sampling): SamplerCustomAdvanced (BasicScheduler, KSamplerSelect euler,
RandomNoise, CFGGuider), SamplerCustom and KSamplerAdvanced equal KSampler on the tiny layered model
(tests/tiny_qwen_image_layered.py) with the same settings; bad latents are refused by each node naming
latent_image and saying why. Without ModelSamplingAuraFlow, KSampler's default schedule is the
pipeline's (its size shift mu = sqrt(tokens / 256) on the released scheduler config)."""
from __future__ import annotations

import pytest
import torch

import tiny_qwen_image_layered as tiny
from node_call import call, environment_over
from nodes import custom_sampling as cs, kontext, latent_layers, loaders, sd3_nodes, split_loaders, text
from nodes import vae as vae_nodes
from nodes.sampling import ksampler
from test_qwen_image_layered import CFG, LAYERS, NEGATIVE, PROMPT, SEED, SIZE, STEPS, TOL, diffusers, picture

#: The custom nodes run KSampler's steps on the same sigmas: equal within float noise, far under 1/255.
CLOSE = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tiny.save_files(tmp_path_factory.mktemp("qwen-layered-sampler-models"))
    yield from environment_over(root, tmp_path_factory.mktemp("qwen-layered-sampler-data"))


@pytest.fixture(scope="module")
def run(env):
    """The template's inputs: the model on ModelSamplingAuraFlow 1, both prompts with the picture as
    ReferenceLatent, the empty layered latent; and the model as loaded (its default schedule), VAE, CLIP."""
    (model,) = call(split_loaders.unet_loader, env, unet_name=tiny.FILES["unet"], weight_dtype="default")
    (clip,) = call(split_loaders.clip_loader, env, clip_name=tiny.FILES["clip"], type="qwen_image")
    (vae,) = call(loaders.vae_loader, env, vae_name=tiny.FILES["vae"])
    (ref,) = call(vae_nodes.vae_encode, env, pixels=torch.from_numpy(picture(1)), vae=vae)
    conds = [call(kontext.reference_latent, env, conditioning=call(text.clip_text_encode, env, text=p, clip=clip)[0],
                  latent=ref)[0] for p in (PROMPT, NEGATIVE)]
    (flat,) = call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=1.0)
    (empty,) = call(latent_layers.empty_qwen_image_layered_latent, env, width=SIZE, height=SIZE, layers=LAYERS)
    return dict(model=flat, positive=conds[0], negative=conds[1], latent=empty, released=model, vae=vae,
                clip=clip)


def _ksampler(env, run, seed: int = SEED, cfg: float = CFG, model=None, steps: int = STEPS) -> torch.Tensor:
    (out,) = call(ksampler, env, model=model or run["model"], seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                  scheduler="simple", positive=run["positive"], negative=run["negative"], latent_image=run["latent"])
    return out["samples"]


def _custom_advanced(env, run, guider, seed: int = SEED) -> dict:
    (noise,) = call(cs.random_noise, env, noise_seed=seed)
    (sampler,) = call(cs.ksampler_select, env, sampler_name="euler")
    (sigmas,) = call(cs.basic_scheduler, env, model=run["model"], scheduler="simple", steps=STEPS, denoise=1.0)
    out, clean = call(cs.sampler_custom_advanced, env, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                      latent_image=run["latent"])
    return {"output": out["samples"], "denoised": clean["samples"]}


def test_every_sampler_node_equals_ksampler_on_layered_latents(env, run):
    """SamplerCustomAdvanced (CFGGuider), SamplerCustom and KSamplerAdvanced give KSampler's layered latent;
    BasicGuider equals KSampler at cfg 1. Not vacuous: another seed moves the result, and so does
    another cfg (the negative prompt is read)."""
    want = _ksampler(env, run)
    assert want.shape == (1, 16, LAYERS + 1, SIZE // 8, SIZE // 8)
    (guider,) = call(cs.cfg_guider, env, model=run["model"], positive=run["positive"], negative=run["negative"],
                     cfg=CFG)
    advanced = _custom_advanced(env, run, guider)
    assert advanced["output"].shape == want.shape and advanced["denoised"].shape == want.shape
    assert float((advanced["output"] - want).abs().max()) <= CLOSE
    # the last euler step to sigma 0 lands on the model's clean prediction
    assert float((advanced["denoised"] - want).abs().max()) <= CLOSE

    (sampler,) = call(cs.ksampler_select, env, sampler_name="euler")
    (sigmas,) = call(cs.basic_scheduler, env, model=run["model"], scheduler="simple", steps=STEPS, denoise=1.0)
    custom, _ = call(cs.sampler_custom, env, model=run["model"], add_noise=True, noise_seed=SEED, cfg=CFG,
                     positive=run["positive"], negative=run["negative"], sampler=sampler, sigmas=sigmas,
                     latent_image=run["latent"])
    assert float((custom["samples"] - want).abs().max()) <= CLOSE

    knobs = dict(model=run["model"], add_noise="enable", noise_seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                 scheduler="simple", positive=run["positive"], negative=run["negative"])
    (whole,) = call(cs.ksampler_advanced, env, latent_image=run["latent"], start_at_step=0, end_at_step=10000,
                    return_with_leftover_noise="disable", **knobs)
    assert float((whole["samples"] - want).abs().max()) <= CLOSE
    # in two halves (leftover noise handed on, add_noise off for the second): still KSampler's run
    (first,) = call(cs.ksampler_advanced, env, latent_image=run["latent"], start_at_step=0, end_at_step=1,
                    return_with_leftover_noise="enable", **knobs)
    assert first["samples"].shape == want.shape
    (second,) = call(cs.ksampler_advanced, env, latent_image=first, start_at_step=1, end_at_step=10000,
                     return_with_leftover_noise="disable", **{**knobs, "add_noise": "disable"})
    assert float((second["samples"] - want).abs().max()) <= CLOSE

    (basic,) = call(cs.basic_guider, env, model=run["model"], conditioning=run["positive"])
    assert float((_custom_advanced(env, run, basic)["output"] - _ksampler(env, run, cfg=1.0)).abs().max()) <= CLOSE

    assert float((_ksampler(env, run, seed=SEED + 1) - want).abs().max()) > 0.05
    assert float((_custom_advanced(env, run, guider, seed=SEED + 1)["output"] - want).abs().max()) > 0.05
    (weak,) = call(cs.cfg_guider, env, model=run["model"], positive=run["positive"], negative=run["negative"],
                   cfg=1.5)
    assert float((_custom_advanced(env, run, weak)["output"] - want).abs().max()) > 0.01


def test_bad_latents_are_refused_by_every_sampler_node(env, run):
    """Through each of the four nodes: an image latent on the layered model, a layered latent on plain
    Qwen-Image, a noise mask on a layered latent: a NodeError naming latent_image and the reason; prompts
    without the picture (text to layers, which the pipeline cannot do either): one naming positive."""
    import tiny_qwen_image
    from safetensors.torch import save_file

    from engine.context import NodeError

    save_file({k: v.contiguous() for k, v in tiny_qwen_image.components()["transformer"].state_dict().items()},
              str(env.paths.models.root / "diffusion_models" / "plain.safetensors"))
    (plain,) = call(split_loaders.unet_loader, env, unet_name="plain.safetensors", weight_dtype="default")
    (sampler,) = call(cs.ksampler_select, env, sampler_name="euler")
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    conds = dict(positive=run["positive"], negative=run["negative"])

    def nodes(model, latent, conds=conds):
        (guider,) = call(cs.cfg_guider, env, model=model, cfg=CFG, **conds)
        yield lambda: call(ksampler, env, model=model, seed=1, steps=2, cfg=CFG, sampler_name="euler",
                           scheduler="simple", latent_image=latent, **conds)
        yield lambda: call(cs.ksampler_advanced, env, model=model, add_noise="enable", noise_seed=1, steps=2,
                           cfg=CFG, sampler_name="euler", scheduler="simple", latent_image=latent, start_at_step=0,
                           end_at_step=10000, return_with_leftover_noise="disable", **conds)
        yield lambda: call(cs.sampler_custom, env, model=model, add_noise=True, noise_seed=1, cfg=CFG,
                           sampler=sampler, sigmas=sigmas, latent_image=latent, **conds)
        yield lambda: call(cs.sampler_custom_advanced, env, noise=call(cs.random_noise, env, noise_seed=1)[0],
                           guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent)

    layered = run["latent"]
    masked = {**layered, "noise_mask": torch.ones(1, SIZE, SIZE)}
    cases = [(run["model"], {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}, "EmptyQwenImageLayeredLatentImage"),
             (plain, layered, "frame axis .* layered latent"),
             (run["model"], masked, "noise mask on a layered latent")]
    for model, latent, reason in cases:
        for node in nodes(model, latent):
            with pytest.raises(NodeError, match=reason) as err:
                node()
            assert err.value.input_name == "latent_image"
    (bare,) = call(text.clip_text_encode, env, text=PROMPT, clip=run["clip"])  # no ReferenceLatent
    for node in nodes(run["model"], layered, conds=dict(positive=bare, negative=bare)):
        with pytest.raises(NodeError, match="text to layers") as err:
            node()
        assert err.value.input_name == "positive"


def test_default_schedule_is_the_pipeline_s_size_shift(env, run, monkeypatch):
    """Without ModelSamplingAuraFlow the layered model samples on QwenImageLayeredPipeline's grid: the
    released scheduler config (the family's) shifted by mu = sqrt(tokens / 256), tokens counted on one
    frame (the picture's size here, as the pipeline counts them); the decoded layers equal the pipeline's
    within 1/255. 3 steps: with 2 the terminal stretch pins the only inner sigma to 0.02 whatever mu is.
    Not vacuous: the sampled latent moves against ModelSamplingAuraFlow 1's and against Qwen-Image's
    linear mu on the stacked frames (the rule before)."""
    import dataclasses

    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nodes import latent_math
    from nodes.samplers import flow

    model = run["released"]
    config = model.scheduler_config
    assert config.get("use_dynamic_shifting") and config.get(flow.MU_RULE) == "sqrt"
    steps = 3
    got = _ksampler(env, run, model=model, steps=steps)
    (cut,) = call(latent_math.latent_cut, env, samples={"samples": got}, dim="t", index=1, amount=16384)
    (batch,) = call(latent_layers.latent_cut_to_batch, env, samples=cut, dim="t", slice_size=1)
    (images,) = call(vae_nodes.vae_decode, env, samples=batch, vae=run["vae"])
    released = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in config.items() if not k.startswith("kiln_") and k != "prediction_type"})
    want = diffusers(picture(1), monkeypatch, scheduler=released, steps=steps)
    assert images.shape == want.shape == (LAYERS, SIZE, SIZE, 4)
    assert float(np.abs(images.numpy() - want).max()) <= TOL
    assert float((got - _ksampler(env, run, steps=steps)).abs().max()) > 0.05  # ModelSamplingAuraFlow 1
    stacked = dataclasses.replace(model, scheduler_config={k: v for k, v in config.items() if k != flow.MU_RULE})
    assert float((got - _ksampler(env, run, model=stacked, steps=steps)).abs().max()) > 0.05
