"""HunyuanImage 2.1 on a tiny random model, from ComfyUI's split files through the real loaders, against
HunyuanImagePipeline.

The tiny model (tests/tiny_hunyuan_image.py) is written as ComfyUI's files: the transformer in Tencent's
original layout (bare and under ``model.diffusion_model.``), Qwen2.5-VL as ComfyUI's qwen_2.5_vl_7b file,
ByT5 with T5's names, the VAE in its original layout. ComfyUI's graph (UNETLoader, DualCLIPLoader type
hunyuan_image, VAELoader, EmptyHunyuanImageLatent, CLIPTextEncode, KSampler euler/simple with a negative
at cfg > 1, VAEDecode) equals the pipeline's image within 1/255, the pipeline handed Kiln's seeded noise
and a plain-CFG guider. The guidance-distilled variant (guidance_in, time_r_in) with FluxGuidance at cfg 1,
through KSampler and SamplerCustomAdvanced, equals the pipeline at its distilled_guidance_scale, the MeanFlow
``timestep_r`` being the next step's timestep.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_hunyuan_image
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.families import hunyuan_image

PROMPT = 'a shop sign that says "OPEN 24h" over a door'
NEGATIVE = "blurry, dark"
SIZE = tiny_hunyuan_image.SIZE
UNET, QWEN, BYT5, VAE = ("tiny-hunyuanimage2.1.safetensors", "tiny-qwen_2.5_vl_7b.safetensors",
                         "tiny-byt5_small_glyphxl.safetensors", "tiny-hunyuan_image_2.1_vae.safetensors")

root = models_root(tiny_hunyuan_image.make_models_folder, "hunyuan-image-models")


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, unet: str = UNET,
           width: int = SIZE) -> dict:
    """ComfyUI's API-format HunyuanImage 2.1 text-to-image graph."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "8": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": QWEN, "clip_name2": BYT5,
                                                         "type": "hunyuan_image", "device": "default"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}},
        "4": {"class_type": "EmptyHunyuanImageLatent", "inputs": {"width": width, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "hunyuan_image"}},
    }


def reference(prompt: str, negative: str, seed: int, steps: int, cfg: float) -> np.ndarray:
    """The pipeline's image from Kiln's seeded noise (one CPU generator per sample, [1, 64, h, w])."""
    cells = SIZE // 32
    noise = torch.randn((1, 64, cells, cells), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        return tiny_hunyuan_image.pipeline(cfg)(prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE,
                                                num_inference_steps=steps, latents=noise, output_type="np").images


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET, "tiny-hunyuanimage2.1-prefixed.safetensors"])
def test_unet_loader_detects_hunyuan_image_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is hunyuan_image.FAMILY and model.scheduler_config["shift"] == hunyuan_image.SHIFT
    want = tiny_hunyuan_image.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
        assert net.config.text_embed_2_dim == tiny_hunyuan_image.BYT5_WIDTH and not net.config.guidance_embeds
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_fused_qkv_export_loads_as_the_split_release():
    """An export with fused ``*_attn_qkv`` and a single block's fused ``linear1`` gives the same module."""
    from nodes.checkpoint import hunyuan_image_keys as keys
    from nodes.checkpoint.hunyuan_image_load import build_transformer

    state = tiny_hunyuan_image.transformer_state()
    fused = {}
    for k, v in state.items():
        if "_attn_q." in k and k.startswith("double_blocks"):
            parts = [state[k.replace("_attn_q.", f"_attn_{p}.")] for p in "qkv"]
            fused[k.replace("_attn_q.", "_attn_qkv.")] = torch.cat(parts)
        elif ".linear1_q." in k:
            parts = [state[k.replace("linear1_q", p)] for p in ("linear1_q", "linear1_k", "linear1_v", "linear1_mlp")]
            fused[k.replace("linear1_q", "linear1")] = torch.cat(parts)
        elif ".linear2.fc." in k:
            fused[k.replace("linear2.fc", "linear2")] = v
        elif not any(s in k for s in ("_attn_k.", "_attn_v.", "linear1_k", "linear1_v", "linear1_mlp")) \
                or not k.startswith(("double_blocks", "single_blocks")):
            fused[k] = v
    assert keys.is_original(fused)
    net = build_transformer(fused, "fused", torch.float32)
    want = tiny_hunyuan_image.components()["transformer"].state_dict()
    assert all(torch.equal(net.state_dict()[k], want[k]) for k in want)


def test_vae_loader_reads_the_original_layout(env):
    from nodes import loaders

    (vae,) = call(loaders.vae_loader, env, vae_name=VAE)
    assert (vae.latent_channels, vae.downscale) == (64, 32)
    want = tiny_hunyuan_image.components()["vae"].state_dict()
    with vae.module() as module:
        got = module.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_dual_clip_loader_builds_qwen25_vl_and_byt5_in_either_order(env):
    for first, second in ((QWEN, BYT5), (BYT5, QWEN)):
        (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=first, clip_name2=second, type="hunyuan_image")
        assert clip.family is hunyuan_image.FAMILY
    want = tiny_hunyuan_image.components()["text_encoder_2"].state_dict()
    with clip.encoder("text_encoder_2") as te:
        got = te.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- conditioning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "a plain prompt", "", "‘左’ and 'right' and “中”"],
                         ids=["quoted", "unquoted", "empty", "all-quotes"])
def test_conditioning_equals_the_pipelines_encode_prompt(env, prompt):
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=QWEN, clip_name2=BYT5, type="hunyuan_image")
    [[ours, extra]] = clip.encode(prompt)
    with torch.no_grad():
        qwen, qmask, byt5, bmask = tiny_hunyuan_image.pipeline(3.0).encode_prompt(prompt, device=torch.device("cpu"))
    valid = qmask[0].bool()
    assert torch.allclose(ours[0], qwen[0][valid], atol=1e-5, rtol=1e-5)
    glyph = hunyuan_image.glyph_text(prompt)
    if glyph is None:
        assert hunyuan_image.BYT5 not in extra and not bmask.any()
    else:
        theirs = byt5[0][bmask[0].bool()]
        assert extra[hunyuan_image.BYT5].shape[1] == theirs.shape[0] == len(glyph.encode()) + 1
        assert torch.allclose(extra[hunyuan_image.BYT5][0], theirs, atol=1e-5, rtol=1e-5)


# -- sampling ---------------------------------------------------------------------------------------------


def test_the_graph_equals_hunyuan_image_pipeline_and_seed_prompt_and_quoted_text_matter(registry, env):
    """KSampler euler/simple at cfg 3.5 with a negative: the pipeline's CFG 3.5 on FlowMatchEuler shift 5."""
    ours = run(registry, env, parse(_graph(PROMPT, NEGATIVE, 3, 4, 3.5))).results["6"][0].numpy()
    theirs = reference(PROMPT, NEGATIVE, 3, 4, 3.5)
    gap = np.abs(ours - theirs).max()
    print(f"hunyuan_image gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    other_seed = run(registry, env, parse(_graph(PROMPT, NEGATIVE, 4, 4, 3.5))).results["6"][0].numpy()
    assert np.abs(ours - other_seed).max() > 0.01  # the seed matters: not vacuous
    other_prompt = 'a fox in the snow at night under many trees, a sign that says "OPEN 24h"'  # the same quote
    other_prompt = run(registry, env, parse(_graph(other_prompt, NEGATIVE, 3, 4, 3.5)))
    assert np.abs(ours - other_prompt.results["6"][0].numpy()).max() > 0.01  # so does the prompt (Qwen's side)
    other_text = run(registry, env, parse(_graph(PROMPT.replace("OPEN 24h", "CLOSED"), NEGATIVE, 3, 4, 3.5)))
    other_text = other_text.results["6"][0].numpy()
    assert np.abs(ours - other_text).max() > 0.01  # and the quoted text (ByT5)
    assert np.abs(other_text - reference(PROMPT.replace("OPEN 24h", "CLOSED"), NEGATIVE, 3, 4, 3.5)).max() <= 1 / 255


# -- bad input ---------------------------------------------------------------------------------------------


def _failure(registry, env, graph: dict) -> tuple[str, str, str, str | None]:
    from engine.executor import Executor

    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status == "failed"
    e = outcome.error
    return e.node_id, e.node_type, e.message, e.input_name


def test_a_qwen_file_where_byt5_belongs_is_named_at_the_loader(registry, env):
    graph = _graph(PROMPT, NEGATIVE, 1, 2, 3.5)
    graph["8"]["inputs"]["clip_name2"] = QWEN
    node, kind, message, name = _failure(registry, env, graph)
    assert (node, kind, name) == ("8", "DualCLIPLoader", "clip_name1")
    assert "type 'hunyuan_image' needs Qwen2.5-VL + ByT5" in message


def test_a_width_not_a_multiple_of_32_is_named(registry, env):
    node, kind, message, name = _failure(registry, env, _graph(PROMPT, NEGATIVE, 1, 2, 3.5, width=SIZE + 16))
    assert (node, kind, name) == ("4", "EmptyHunyuanImageLatent", "width")
    assert "multiple of 32" in message


@pytest.mark.parametrize("change,wanted", [
    (lambda s: s.update({"double_blocks.0.img_attn_bogus.weight": torch.zeros(2)}),
     "'double_blocks.0.img_attn_bogus.weight'"),
    (lambda s: s.pop("double_blocks.1.img_mlp.fc2.weight"), "transformer_blocks.1.ff.net.2.weight"),
], ids=["unexpected", "missing"])
def test_a_key_mismatch_names_the_family_and_the_key(registry, env, root, change, wanted):
    from flow_family_files import save_state

    state = tiny_hunyuan_image.transformer_state()
    change(state)
    save_state(root / "diffusion_models" / "tiny-hunyuan-bad.safetensors", state)
    node, kind, message, name = _failure(registry, env, _graph(PROMPT, NEGATIVE, 1, 2, 3.5,
                                                               unet="tiny-hunyuan-bad.safetensors"))
    assert (node, kind, name) == ("1", "UNETLoader", "unet_name")
    assert "HunyuanImage 2.1" in message and wanted in message, message


DISTILLED = "tiny-hunyuan-distilled.safetensors"
#: The offsets of the distilled file's guidance_in and time_r_in from time_in (each embedder its own weights).
DISTILLED_OFFSETS = {"guidance_in": 0.01, "time_r_in": -0.02}


def _save_distilled(root) -> str:
    """The tiny transformer with the distilled model's guidance_in and time_r_in (time_in's weights offset)."""
    from flow_family_files import save_state

    state = tiny_hunyuan_image.transformer_state()
    for name, offset in DISTILLED_OFFSETS.items():
        state |= {k.replace("time_in", name): v.clone() + offset for k, v in state.items() if k.startswith("time_in.")}
    save_state(root / "diffusion_models" / DISTILLED, state)
    return DISTILLED


def _distilled_reference(prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
    """HunyuanImagePipeline's image on the distilled transformer built by diffusers (``guidance_embeds``,
    ``use_meanflow``; its embedders' weights as :func:`_save_distilled` writes them, in diffusers' names),
    with no CFG guider (the distilled model's default) and ``distilled_guidance_scale``."""
    from diffusers import HunyuanImageTransformer2DModel

    base = tiny_hunyuan_image.components()["transformer"]
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}  # _use_default_values would undo them
    net = HunyuanImageTransformer2DModel(**config | {"guidance_embeds": True, "use_meanflow": True})
    state = dict(base.state_dict())
    embedder = "time_guidance_embed.timestep_embedder."
    for name, offset in (("guidance_embedder.", DISTILLED_OFFSETS["guidance_in"]),
                         ("timestep_embedder_r.", DISTILLED_OFFSETS["time_r_in"])):
        state |= {k.replace("timestep_embedder.", name): v.clone() + offset for k, v in base.state_dict().items()
                  if k.startswith(embedder)}
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    from flow_family_files import quiet_pipeline

    pipe = quiet_pipeline("HunyuanImagePipeline", {**tiny_hunyuan_image.components(), "transformer": net}, guider=None)
    cells = SIZE // 32
    noise = torch.randn((1, 64, cells, cells), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        return pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=steps, latents=noise,
                    distilled_guidance_scale=guidance, output_type="np").images


def _with_guidance(graph: dict, guidance: float) -> dict:
    """``graph`` with FluxGuidance on the positive prompt (the distilled model's guidance value)."""
    graph["10"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": guidance}}
    graph["5"]["inputs"]["positive"] = ["10", 0]
    return graph


def _custom_graph(prompt: str, seed: int, steps: int, guidance: float, unet: str) -> dict:
    """The same with ComfyUI's custom-sampling nodes (BasicGuider, KSamplerSelect euler, BasicScheduler
    simple, RandomNoise, SamplerCustomAdvanced)."""
    graph = _with_guidance(_graph(prompt, NEGATIVE, seed, steps, 1.0, unet=unet), guidance)
    del graph["5"], graph["3"]
    graph |= {
        "11": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["10", 0]}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": steps,
                                                          "denoise": 1.0}},
        "14": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["14", 0], "guider": ["11", 0],
                                                                "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                "latent_image": ["4", 0]}},
    }
    return graph


def test_the_distilled_variant_loads_with_its_guidance_embedder(env, root):
    """guidance_in and time_r_in read from the shapes: diffusers' ``guidance_embeds`` and ``use_meanflow``."""
    (model,) = call(split_loaders.unet_loader, env, unet_name=_save_distilled(root))
    with model._use_unet() as net:
        assert net.config.guidance_embeds and net.config.use_meanflow


def test_the_distilled_graph_equals_the_pipeline_with_the_next_timestep_as_timestep_r(registry, env, root,
                                                                                      monkeypatch):
    """KSampler euler/simple at cfg 1 with FluxGuidance 4.5: the pipeline at distilled_guidance_scale 4.5, whose
    MeanFlow ``timestep_r`` is the next step's timestep (0 at the last). Not vacuous: with ``timestep_r`` equal
    to ``timestep``, or none, the image is far from the pipeline's; another guidance changes it."""
    from nodes.families.denoiser import Denoiser
    from nodes.families.hunyuan_image import HunyuanImageNetwork

    unet = _save_distilled(root)
    graph = _with_guidance(_graph(PROMPT, NEGATIVE, 3, 4, 1.0, unet=unet), 4.5)
    ours = run(registry, env, parse(graph)).results["6"][0].numpy()
    theirs = _distilled_reference(PROMPT, 3, 4, 4.5)
    gap = np.abs(ours - theirs).max()
    print(f"hunyuan_image distilled gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    other_guidance = _with_guidance(_graph(PROMPT, NEGATIVE, 3, 4, 1.0, unet=unet), 2.0)
    assert np.abs(ours - run(registry, env, parse(other_guidance)).results["6"][0].numpy()).max() > 0.01
    with monkeypatch.context() as patched:  # timestep_r = timestep: the current sigma as the step's end
        patched.setattr(Denoiser, "next_sigma", lambda self, t: float(self.schedule.sigma(t).reshape(-1)[0]))
        same_time = run(registry, env, parse(graph)).results["6"][0].numpy()
    with monkeypatch.context() as patched:  # no timestep_r at all (Kiln before the step's end was passed)
        patched.setattr(HunyuanImageNetwork, "reads_next_sigma", property(lambda self: False))
        without = run(registry, env, parse(graph)).results["6"][0].numpy()
    for name, image in (("timestep_r = timestep", same_time), ("no timestep_r", without)):
        wrong = np.abs(image - theirs).max()
        print(f"hunyuan_image distilled, {name}: gap {wrong * 255:.3f}/255")
        assert wrong > 10 / 255, (name, wrong)


def test_the_distilled_custom_sampling_graph_equals_the_pipeline(registry, env, root):
    """SamplerCustomAdvanced (BasicGuider, euler, BasicScheduler simple) gives the step's end as KSampler does."""
    unet = _save_distilled(root)
    ours = run(registry, env, parse(_custom_graph(PROMPT, 5, 3, 3.25, unet))).results["6"][0].numpy()
    gap = np.abs(ours - _distilled_reference(PROMPT, 5, 3, 3.25)).max()
    print(f"hunyuan_image distilled custom sampling gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap


def test_a_multi_stage_sampler_gives_each_evaluation_the_level_after_its_own(registry, env, root, monkeypatch):
    """KSampler heun (two evaluations a step) at cfg 2 on the distilled model: each call's ``sigma_next`` is the
    grid's level after the one it is evaluated at (0 after the last), as nodes.samplers.schedules.next_sigma says."""
    from nodes.families.hunyuan_image import HunyuanImageNetwork

    seen: list[tuple[float, float]] = []
    original = HunyuanImageNetwork.__call__

    def spy(self, x, t, encoder_hidden_states, sigma_next=None, **kwargs):
        seen.append((float(torch.as_tensor(t).reshape(-1)[0]) / 1000.0, sigma_next))
        return original(self, x, t, encoder_hidden_states, sigma_next=sigma_next, **kwargs)

    monkeypatch.setattr(HunyuanImageNetwork, "__call__", spy)
    graph = _with_guidance(_graph(PROMPT, NEGATIVE, 3, 3, 2.0, unet=_save_distilled(root)), 3.0)
    graph["5"]["inputs"]["sampler_name"] = "heun"
    run(registry, env, parse(graph))
    grid = sorted({round(s, 5) for s, _ in seen} | {0.0}, reverse=True)
    assert len(seen) > 3 and len(grid) == 4, seen  # more calls than steps, at the 3 levels
    for sigma, after in seen:
        assert after is not None and abs(after - grid[grid.index(round(sigma, 5)) + 1]) < 1e-4, (sigma, after)


def test_rows_with_and_without_glyph_text_in_one_call_equal_their_own_calls(env):
    """Two prompts of one Qwen length, one with quoted text and one without, batched: the glyph rows are padded
    and masked (network_kwargs), and each row equals its call alone."""
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=QWEN, clip_name2=BYT5, type="hunyuan_image")
    [[states, quoted]] = clip.encode('a sign "HI"')
    family = hunyuan_image.FAMILY
    net = family.wrap_network(tiny_hunyuan_image.components()["transformer"])
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    extras = [quoted, {}]
    with torch.no_grad():
        both = net(x, 700.0, torch.cat([states, states]),
                   **family.network_kwargs(extras, 1, (SIZE, SIZE), "cpu", torch.float32))[0]
        alone = [net(x[i:i + 1], 700.0, states, **family.network_kwargs([e], 1, (SIZE, SIZE), "cpu", torch.float32))[0]
                 for i, e in enumerate(extras)]
    assert torch.allclose(both, torch.cat(alone), atol=1e-5)
    assert (alone[0] - net(x[:1], 700.0, states)[0]).abs().max() > 1e-3  # the glyph text is read
