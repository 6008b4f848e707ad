"""HunyuanImage 2.1 on a tiny random model, from ComfyUI's split files through the real loaders, against
HunyuanImagePipeline.

The tiny model (tests/tiny_hunyuan_image.py) is written as ComfyUI's files: the transformer in Tencent's
original layout (bare and under ``model.diffusion_model.``), Qwen2.5-VL as ComfyUI's qwen_2.5_vl_7b file,
ByT5 with T5's names, the VAE in its original layout. ComfyUI's graph (UNETLoader, DualCLIPLoader type
hunyuan_image, VAELoader, EmptyHunyuanImageLatent, CLIPTextEncode, KSampler euler/simple with a negative
at cfg > 1, VAEDecode) equals the pipeline's image within 1/255, the pipeline handed Kiln's seeded noise
and a plain-CFG guider.
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


def test_a_refiner_is_refused_by_name(registry, env, root):
    from flow_family_files import save_state

    state = tiny_hunyuan_image.transformer_state()
    state["img_in.proj.weight"] = state["img_in.proj.weight"].unsqueeze(2)
    save_state(root / "diffusion_models" / "tiny-hunyuan-refiner.safetensors", state)
    node, kind, message, name = _failure(registry, env, _graph(PROMPT, NEGATIVE, 1, 2, 3.5,
                                                               unet="tiny-hunyuan-refiner.safetensors"))
    assert (node, kind, name) == ("1", "UNETLoader", "unet_name") and "refiner" in message


def test_the_distilled_variant_loads_with_its_guidance_embedder(registry, env, root):
    """guidance_in and time_r_in read from the shapes; the graph runs (not compared: MeanFlow's second time
    input is not passed, see the README)."""
    from flow_family_files import save_state

    state = tiny_hunyuan_image.transformer_state()
    for name in ("guidance_in", "time_r_in"):
        state |= {k.replace("time_in", name): v.clone() + 0.01 for k, v in state.items() if k.startswith("time_in.")}
    save_state(root / "diffusion_models" / "tiny-hunyuan-distilled.safetensors", state)
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-hunyuan-distilled.safetensors")
    with model._use_unet() as net:
        assert net.config.guidance_embeds and net.config.use_meanflow
    graph = _graph(PROMPT, NEGATIVE, 1, 2, 1.0, unet="tiny-hunyuan-distilled.safetensors")
    image = run(registry, env, parse(graph)).results["6"][0].numpy()
    assert np.isfinite(image).all()


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
