"""Ideogram 4 on a tiny random model, from ComfyUI's split files through the real loaders, against Ideogram4Pipeline.

The tiny Ideogram 4 (tests/tiny_ideogram4.py) is written as ComfyUI's files: both transformers in
ComfyUI's key layout (the conditional one also under ``model.diffusion_model.`` and in diffusers'
layout), Qwen3-VL as ComfyUI's qwen3vl file, the FLUX.2 VAE. The template's graph (UNETLoader x2,
CLIPLoader type ideogram4, ConditioningZeroOut, CFGOverride, DualModelGuider, Ideogram4Scheduler,
SamplerCustomAdvanced) equals Ideogram4Pipeline's image within 1/255 per pixel, the pipeline given
Kiln's starting noise (it draws in token order) and CFGOverride's window as its guidance_schedule.
Each parity test also checks that what it varies changes the picture.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_ideogram4
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import dual_model_nodes, split_loaders, string_nodes
from nodes.checkpoint import ideogram4_keys
from nodes.families import ideogram4

PROMPT = '{"high_level_description": "a red fox"}'
SIZE, STEPS, SEED = 64, 4, 7
#: The scheduler's size: the template clamps it to 256 at least (ComfyMathExpression), as the node's minimum.
SCHEDULE_SIZE = 256
UNET, UNCOND = "tiny-ideogram4.safetensors", "tiny-ideogram4_unconditional.safetensors"
CLIP, VAE = "tiny-qwen3vl_8b.safetensors", "tiny-flux2-vae.safetensors"
#: Linear layers in the tiny transformer's blocks (q, k, v, out, w1, w2, w3, adaln per block).
LAYER_LINEARS = 8 * tiny_ideogram4.LAYERS

root = models_root(tiny_ideogram4.make_models_folder, "ideogram4-models")


def _graph(*, unet: str = UNET, uncond: str = UNCOND, cfg: float = 7.0, override: float = 3.0,
           start: float = 0.7, mu: float = 0.0, std: float = 1.75) -> dict:
    """The template's sampling, flattened (its subgraph's nodes and widget values, tiny sizes)."""
    return {
        "23": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "154": {"class_type": "UNETLoader", "inputs": {"unet_name": uncond, "weight_dtype": "default"}},
        "14": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "ideogram4"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "24": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["14", 0]}},
        "10": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["24", 0]}},
        "157": {"class_type": "CFGOverride", "inputs": {"model": ["23", 0], "cfg": override, "start_percent": start,
                                                        "end_percent": 1.0}},
        "155": {"class_type": "DualModelGuider", "inputs": {"model": ["157", 0], "positive": ["24", 0],
                                                            "model_negative": ["154", 0], "negative": ["10", 0],
                                                            "cfg": cfg}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "Ideogram4Scheduler", "inputs": {"steps": STEPS, "width": SCHEDULE_SIZE,
                                                              "height": SCHEDULE_SIZE,
                                                              "mu": mu, "std": std}},
        "18": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "11": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["18", 0], "guider": ["155", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["11", 0]}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["9", 0]}},
        "158": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "ideogram4"}},
    }


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["13"][0].numpy()


def _reference(cfg: float = 7.0, override: float = 3.0, start: float = 0.7, mu: float = 0.0,
               std: float = 1.75, one_model: bool = False) -> np.ndarray:
    """Ideogram4Pipeline on the same weights: Kiln's starting noise in token order, and the guidance
    schedule CFGOverride's window gives (ComfyUI's rule on plain flow sigmas: 0 < sigma <= 1 - start); its mu
    moved so that its size rule at SIZE gives the scheduler's mean at SCHEDULE_SIZE."""
    import math

    sigmas = dual_model_nodes.ideogram4_sigmas(STEPS, SCHEDULE_SIZE, SCHEDULE_SIZE, mu, std)
    schedule = [override if 0.0 < float(s) <= 1.0 - start else cfg for s in sigmas[:-1]]
    cells = SIZE // 16
    noise = torch.randn((1, 128, cells, cells), generator=torch.Generator("cpu").manual_seed(SEED))
    pipe = tiny_ideogram4.pipeline()
    if one_model:
        pipe.unconditional_transformer = pipe.transformer
    with torch.no_grad():
        return pipe(
            prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_schedule=schedule,
            mu=mu + math.log(SCHEDULE_SIZE / SIZE), std=std, latents=ideogram4.to_tokens(noise), max_sequence_length=64, output_type="np").images


# -- loading ------------------------------------------------------------------------------------------


def test_key_table_round_trips_and_splits_the_fused_attention():
    original = tiny_ideogram4.original_state()
    assert ideogram4_keys.ORIGINAL_MARKER in original and "layers.0.attention.o.weight" in original
    ours = ideogram4_keys.original_to_diffusers(original)
    want = tiny_ideogram4.components()["transformer"].state_dict()
    assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want)
    back = ideogram4_keys.diffusers_to_original(ours)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("name,which", [(UNET, "transformer"), ("tiny-ideogram4-prefixed.safetensors", "transformer"),
                                        ("tiny-ideogram4-diffusers-keys.safetensors", "transformer"),
                                        (UNCOND, "unconditional_transformer")])
def test_unet_loader_detects_ideogram4_and_loads_the_weights_bit_for_bit(env, name, which):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is ideogram4.FAMILY
    want = tiny_ideogram4.components()[which].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_fp8_scaled_file_equals_its_dequantised_twin_with_scales_split_with_qkv(env, root):
    """Comfy's fp8_scaled layout: each linear's row scales follow the fused qkv's split into to_q/k/v."""
    from test_scaled_fp8 import _compare, quantise

    scaled, plain = quantise(tiny_ideogram4.original_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "ideogram4-fp8_scaled.safetensors", scaled)
    save_state(root / "diffusion_models" / "ideogram4-fp8-dequant.safetensors", plain)
    (a,) = call(split_loaders.unet_loader, env, unet_name="ideogram4-fp8_scaled.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="ideogram4-fp8-dequant.safetensors")
    assert a.family is ideogram4.FAMILY
    with a.unet() as x, b.unet() as y:
        layers, _ = _compare(x, y)
        assert "qkv" not in str(x.layers[0].attention)
    assert layers >= LAYER_LINEARS  # every block linear, q/k/v each with its share of the scale


def test_conditioning_equals_the_pipelines_text_features(env):
    """Kiln's tokens without padding give the pipeline's features at every real token (left padding has no
    attention there), the 13 taps interleaved width-major as the pipeline packs them."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ideogram4")
    assert clip.family is ideogram4.FAMILY
    [[ours, _]] = clip.encode(PROMPT)
    with torch.no_grad():
        theirs, _, _, indicator = tiny_ideogram4.pipeline().encode_prompt(PROMPT, 1, 1, 64, torch.device("cpu"))
    real = theirs[0, :64][indicator[0, :64] == 3]
    assert ours.shape == (1, real.shape[0], 13 * 32)
    assert torch.allclose(ours[0], real.float(), atol=1e-5, rtol=1e-5)


def test_the_scheduler_is_the_pipelines_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _logit_normal_sigmas, _resolution_aware_mu

    (ours,) = call(dual_model_nodes.ideogram4_scheduler, None, steps=12, width=768, height=1024, mu=0.5, std=1.75)
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=_logit_normal_sigmas(12, _resolution_aware_mu(1024, 768, 0.5), std=1.75).tolist())
    assert ours.shape == (13,) and float(ours[-1]) == 0.0
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6)


# -- parity -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _reference()


def test_the_template_graph_equals_ideogram4_pipeline(registry, env, reference):
    ours = _run(registry, env, _graph())
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1 / 255
    # not vacuous: the unconditional model and the override both change the picture
    other = _run(registry, env, _graph(uncond=UNET))
    assert np.abs(other - reference).max() > 0.02
    plain = _reference(override=7.0)  # the window covers the last steps and its cfg matters on both sides
    assert 0 < sum(0.0 < float(s) <= 0.3 for s in dual_model_nodes.ideogram4_sigmas(STEPS, 256, 256, 0.0, 1.75)) < STEPS
    assert np.abs(plain - reference).max() > 0.02
    assert np.abs(_run(registry, env, _graph(override=7.0)) - plain).max() <= 1 / 255


# -- the utility node and errors ------------------------------------------------------------------------


@pytest.mark.parametrize("text,key,want", [
    ('{"Default": {"num_steps": 20, "mu": 0.0}}', "Default", "{'num_steps': 20, 'mu': 0.0}"),
    ('{"num_steps": 20, "std": 1.75}', "std", "1.75"),
    ('Here: ```json\n{"a": "b"}\n```', "a", "b"),
    ('{not json} then {"a": "x"}', "a", "x"),
    ('{"a": null}', "a", ""), ('{"a": 1}', "missing", ""), ("no object", "a", ""),
])
def test_json_extract_string_reads_the_first_object(text, key, want):
    assert call(string_nodes.json_extract_string, None, json_string=text, key=key) == (want,)


def test_bad_inputs_name_node_inputs(env):
    from engine.context import NodeError

    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ideogram4")
    cond = clip.encode(PROMPT)
    with pytest.raises(NodeError) as err:
        call(dual_model_nodes.dual_model_guider, env, model=model, positive=cond, cfg=4.0, model_negative="x")
    assert err.value.input_name == "model_negative"
    with pytest.raises(NodeError) as err:
        call(dual_model_nodes.dual_model_guider, env, model=model, positive="text", cfg=4.0)
    assert err.value.input_name == "positive"
    with pytest.raises(NodeError) as err:
        call(dual_model_nodes.cfg_override, env, model=model, cfg=3.0, start_percent=1.5, end_percent=1.0)
    assert err.value.input_name == "start_percent"
    with pytest.raises(NodeError) as err:
        call(dual_model_nodes.ideogram4_scheduler, env, steps=4, width=64, height=64, mu=0.0, std=0.0)
    assert err.value.input_name == "std"


def test_conditioning_of_another_width_names_the_positive_input():
    from nodes.families.base import ConditioningError

    net = ideogram4.FAMILY.wrap_network(tiny_ideogram4.components()["transformer"])
    x = torch.randn(1, 128, 2, 2)
    with pytest.raises(ConditioningError) as err:
        net(x, torch.tensor(500.0), torch.randn(1, 3, 100))
    assert err.value.input_name == "positive" and "ideogram4" in str(err.value)
    (zero,) = net(x, torch.tensor(500.0), torch.zeros(1, 3, 13 * 32))  # all zeros: the image-only pass
    (text,) = net(x, torch.tensor(500.0), torch.randn(1, 3, 13 * 32))
    assert zero.shape == x.shape and (zero - text).abs().max() > 1e-3


def test_a_batch_mixing_zero_and_real_conditioning_runs_each_as_its_own_pass():
    net = ideogram4.FAMILY.wrap_network(tiny_ideogram4.components()["transformer"])
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 128, 2, 3, generator=g), torch.randn(1, 3, 13 * 32, generator=g)
    (both,) = net(x, torch.tensor(300.0), torch.cat([text, torch.zeros_like(text)]))
    (first,) = net(x[:1], torch.tensor(300.0), text)
    (second,) = net(x[1:], torch.tensor(300.0), torch.zeros_like(text))
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)


def test_cfg_override_windows_follow_comfyuis_sigma_rule_and_the_last_applied_wins():
    from nodes.families.base import ConditioningError
    from nodes.families.dual_model import CFGWindow, applied, windows
    from nodes.samplers.schedules import training_schedule

    schedule = training_schedule(ideogram4.SCHEDULER)
    found = windows((CFGWindow(3.0, 0.7, 1.0), CFGWindow(5.0, 0.8, 1.0)), schedule)
    denoiser = type("D", (), {"cfg": 7.0, "guided": True})()
    seen = {}
    for sigma in (0.9, 0.3, 0.25, 0.1, 0.0):
        with applied(denoiser, found, sigma):
            seen[sigma] = denoiser.cfg
    assert abs(found[1][2] - 0.3) < 1e-3 and abs(found[0][2] - 0.2) < 1e-3  # percent p -> sigma 1 - p
    assert seen == {0.9: 7.0, 0.3: 3.0, 0.25: 3.0, 0.1: 5.0, 0.0: 7.0} and denoiser.cfg == 7.0
    denoiser.guided = False  # a run at cfg 1 never evaluates its negative
    with pytest.raises(ConditioningError) as err:
        with applied(denoiser, found, 0.1):
            pass
    assert err.value.input_name == "model"


def test_without_model_negative_and_negative_the_guider_runs_the_text_free_pass_on_model(registry, env, reference):
    """DualModelGuider with neither optional input: ComfyUI's CFGGuider on ``model`` with a text-free
    negative, i.e. the pipeline with its conditional transformer on the unconditional side too."""
    graph = _graph()
    del graph["155"]["inputs"]["model_negative"], graph["155"]["inputs"]["negative"]
    ours = _run(registry, env, graph)
    assert np.abs(ours - _reference(one_model=True)).max() <= 1 / 255
    assert np.abs(ours - reference).max() > 0.02


def test_at_cfg_1_the_negative_model_is_not_held_and_the_picture_is_the_positive_sides(env):
    """DualModelGuider at cfg 1 without a CFGOverride never evaluates its negative side, so the run does not
    hold the negative model: one whose load fails (its file gone) still samples, to the same latent as a
    run holding a loadable one; at cfg 4 the same failing model is asked for and the failure surfaces."""
    import contextlib
    import dataclasses

    from nodes import custom_sampling as cs

    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (negative_model,) = call(split_loaders.unet_loader, env, unet_name=UNCOND)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ideogram4")
    positive, negative = clip.encode(PROMPT), clip.encode("")

    @contextlib.contextmanager
    def gone():
        raise FileNotFoundError("the unconditional model's file is gone")
        yield

    unloadable = dataclasses.replace(negative_model, _use_unet=gone)

    def sample(neg_model, cfg: float):
        (guider,) = call(dual_model_nodes.dual_model_guider, env, model=model, positive=positive, cfg=cfg,
                         model_negative=neg_model, negative=negative)
        (sigmas,) = call(dual_model_nodes.ideogram4_scheduler, env, steps=2, width=64, height=64, mu=0.0, std=1.75)
        out, _ = call(cs.sampler_custom_advanced, env, noise=cs.random_noise(None, 3)[0], guider=guider,
                      sampler=cs.ksampler_select(None, "euler")[0], sigmas=sigmas,
                      latent_image={"samples": torch.zeros(1, 128, 2, 2)})
        return out["samples"]

    assert torch.equal(sample(unloadable, 1.0), sample(negative_model, 1.0))
    with pytest.raises(FileNotFoundError):
        sample(unloadable, 4.0)


def test_dual_model_guider_applies_the_model_s_guidance_rule_on_both_models(env):
    """CFGZeroStar on ``model`` (a post-CFG rule, which ComfyUI's DualModelGuider runs in its CFG function):
    with the patched model on both inputs the run equals CFGGuider's with the same patch, and with the
    unconditional transformer as model_negative the rule changes the two-model picture (its formula on
    two models is checked on the tiny SD1, tests/test_dual_model_patches.py)."""
    from nodes import custom_sampling as cs
    from nodes import guidance_patches as gp

    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (negative_model,) = call(split_loaders.unet_loader, env, unet_name=UNCOND)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ideogram4")
    positive, negative = clip.encode(PROMPT), clip.encode("")
    (patched,) = call(gp.cfg_zero_star, env, model=model)

    def sample(guider):
        (sigmas,) = call(dual_model_nodes.ideogram4_scheduler, env, steps=2, width=64, height=64, mu=0.0, std=1.75)
        out, _ = call(cs.sampler_custom_advanced, env, noise=cs.random_noise(None, 3)[0], guider=guider,
                      sampler=cs.ksampler_select(None, "euler")[0], sigmas=sigmas,
                      latent_image={"samples": torch.zeros(1, 128, 2, 2)})
        return out["samples"]

    def dual(pos_model, neg_model):
        (guider,) = call(dual_model_nodes.dual_model_guider, env, model=pos_model, positive=positive, cfg=4.0,
                         model_negative=neg_model, negative=negative)
        return sample(guider)

    want = sample(call(cs.cfg_guider, env, model=patched, positive=positive, negative=negative, cfg=4.0)[0])
    assert (dual(patched, patched) - want).abs().max() <= 1e-5 * want.abs().max()
    assert (want - sample(call(cs.cfg_guider, env, model=model, positive=positive, negative=negative,
                                cfg=4.0)[0])).abs().max() > 1e-2  # the rule acts here
    assert (dual(patched, negative_model) - dual(model, negative_model)).abs().max() > 1e-2
