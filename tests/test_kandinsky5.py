"""Kandinsky 5.0 Image Lite on a tiny random model, from ComfyUI's split files through the real loaders,
against Kandinsky5T2IPipeline.

The tiny Kandinsky 5 (tests/tiny_kandinsky5.py) is written as ComfyUI's files: the transformer in its one
key layout (bare and under ``model.diffusion_model.``), Qwen2.5-VL as ComfyUI's qwen_2.5_vl_7b file,
CLIP-L and FLUX's VAE in the original layouts. The graph (UNETLoader, DualCLIPLoader type
kandinsky5_image, VAELoader, ModelSamplingSD3 3, KSampler euler/simple with a negative at cfg > 1)
equals the pipeline's image within 1/255 per pixel, the pipeline handed Kiln's seeded noise (its own
is channels-last); its latents are decoded as the pipeline decodes them (FLUX's scale, no shift), and the
sampled latents are compared too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_kandinsky5
import tiny_qwen_image
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.families import kandinsky5

PROMPT = "a fox in the snow"
NEGATIVE = "blurry, dark"
SIZE = tiny_kandinsky5.SIZE
UNET, QWEN, CLIP_L, VAE = ("tiny-kandinsky5.safetensors", "tiny-qwen_2.5_vl.safetensors", "tiny-clip_l.safetensors",
                           "tiny-ae.safetensors")

root = models_root(lambda folder: tiny_kandinsky5.make_models_folder(folder, diffusers=True), "kandinsky5-models")


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, unet: str = UNET) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "8": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": QWEN, "clip_name2": CLIP_L,
                                                         "type": "kandinsky5_image"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "kandinsky5"}},
    }


def decoded(pipe, prompt: str, negative: str, seed: int, steps: int, cfg: float) -> tuple[np.ndarray, torch.Tensor]:
    """(``pipe``'s image decoded as the pipeline decodes it, its model-space latent [1, 16, h, w])
    from Kiln's seeded noise (nodes.sampling: one CPU generator per sample, [1, C, h, w])."""
    noise = torch.randn((1, 16, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        out = pipe(prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps,
                   guidance_scale=cfg, latents=noise.permute(0, 2, 3, 1).unsqueeze(1), output_type="latent").image
        latent = out[:, 0].permute(0, 3, 1, 2)
        vae = pipe.vae
        image = vae.decode(latent / vae.config.scaling_factor).sample  # the pipeline's decode
    return pipe.image_processor.postprocess(image, output_type="np"), latent


def reference(prompt: str, negative: str, seed: int, steps: int, cfg: float) -> tuple[np.ndarray, torch.Tensor]:
    """:func:`decoded` for the tiny pipeline."""
    return decoded(tiny_kandinsky5.pipeline(), prompt, negative, seed, steps, cfg)


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET, "tiny-kandinsky5-prefixed.safetensors"])
def test_unet_loader_detects_kandinsky5_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is kandinsky5.FAMILY and model.scheduler_config["shift"] == 3.0
    want = tiny_kandinsky5.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
        assert dict(net.config)["axes_dims"] == (8, 12, 12) and not net.config.visual_cond
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_diffusers_folder_through_checkpoint_loader_gives_the_split_files_picture(registry, env):
    from flow_family_files import checkpoint_loader, txt2img_graph

    graph = txt2img_graph(checkpoint_loader("tiny-kandinsky5-diffusers"), prompt=PROMPT, negative=NEGATIVE, size=SIZE,
                          seed=3, steps=4, cfg=3.5, scheduler="simple", latent="EmptyLatentImage")
    outcome = run(registry, env, parse(graph))
    ours = outcome.results["6"][0].numpy()
    split = run(registry, env, parse(_graph(PROMPT, NEGATIVE, 3, 4, 3.5))).results["6"][0].numpy()
    assert np.abs(ours - split).max() <= 1 / 255
    assert np.abs(ours - reference(PROMPT, NEGATIVE, 3, 4, 3.5)[0]).max() <= 1 / 255


def test_a_bf16_load_keeps_the_modulations_in_float32_as_diffusers_does():
    from nodes.checkpoint.kandinsky5_load import build_transformer

    net = build_transformer(tiny_kandinsky5.transformer_state(), "tiny", torch.bfloat16)
    kept = {n: p.dtype for n, p in net.named_parameters()
            if any(part in net._keep_in_fp32_modules for part in n.split("."))}
    assert len(kept) > 8 and set(kept.values()) == {torch.float32}
    assert net.visual_transformer_blocks[0].self_attention.to_query.weight.dtype == torch.bfloat16
    want = tiny_kandinsky5.components()["transformer"].state_dict()
    assert all(torch.equal(net.state_dict()[k], want[k]) for k in kept)


def test_dual_clip_loader_builds_qwen25_vl_and_clip_l_in_either_order(env):
    import tiny_flux
    import tiny_qwen_image

    for first, second in ((QWEN, CLIP_L), (CLIP_L, QWEN)):
        (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=first, clip_name2=second,
                       type="kandinsky5_image")
        assert clip.family is kandinsky5.FAMILY
    want = {k.removeprefix("text_model."): v for k, v in tiny_flux.components()["text_encoder"].state_dict().items()}
    with clip.encoder("text_encoder_2") as te:
        got = {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}
    assert "final_layer_norm.weight" in got and set(got) <= set(want)
    assert all(torch.equal(got[k], want[k]) for k in got)
    want = tiny_qwen_image.components()["text_encoder"].model.language_model.state_dict()
    with clip.encoder("text_encoder") as lm:  # Qwen2.5-VL: its language model (the tower waits for a picture)
        got = {k.removeprefix("language_model."): v for k, v in lm.state_dict().items()
               if k.startswith("language_model.")}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# -- conditioning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "", "  a &amp; b\n\n  words  ", "a long prompt, " * 200],
                         ids=["prompt", "empty", "cleaned", "past-512-tokens"])
def test_conditioning_equals_the_pipelines_encode_prompt(env, prompt):
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=QWEN, clip_name2=CLIP_L, type="kandinsky5_image")
    [[ours, extra]] = clip.encode(prompt)
    with torch.no_grad():
        qwen, pooled, cu = tiny_kandinsky5.pipeline().encode_prompt(prompt, device=torch.device("cpu"),
                                                                    dtype=torch.float32)
    assert ours.shape == qwen.shape and int(cu[-1]) == ours.shape[1]
    assert ours.shape[1] == kandinsky5.MAX_TOKENS if len(prompt) > 1000 else ours.shape[1] < 20  # cut where it cuts
    assert torch.allclose(ours, qwen, atol=1e-5, rtol=1e-5)
    assert torch.allclose(extra["pooled_output"], pooled, atol=1e-5, rtol=1e-5)


# -- sampling ---------------------------------------------------------------------------------------------


def test_the_graph_equals_kandinsky5_pipeline_and_the_prompt_and_seed_matter(registry, env):
    """KSampler euler/simple at cfg 3.5 with ModelSamplingSD3 3: the pipeline's guidance_scale 3.5 on
    FlowMatchEuler shift 3 (its own spacing)."""
    outcome = run(registry, env, parse(_graph(PROMPT, NEGATIVE, 3, 6, 3.5)))
    ours = outcome.results["6"][0].numpy()
    theirs, latent = reference(PROMPT, NEGATIVE, 3, 6, 3.5)
    gap = np.abs(ours - theirs).max()
    print(f"kandinsky5 gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    sampled = outcome.results["5"][0]["samples"]
    model_space = (sampled - kandinsky5.FAMILY.latent.shift) * kandinsky5.FAMILY.latent.scale
    assert torch.allclose(model_space, latent, atol=1e-4), float((model_space - latent).abs().max())
    other_seed = run(registry, env, parse(_graph(PROMPT, NEGATIVE, 4, 6, 3.5))).results["6"][0].numpy()
    assert np.abs(ours - other_seed).max() > 0.02  # the seed matters: not vacuous
    other_prompt = run(registry, env, parse(_graph("a red car", NEGATIVE, 3, 6, 3.5))).results["6"][0].numpy()
    assert np.abs(ours - other_prompt).max() > 0.02  # so does the prompt


# -- bad input ---------------------------------------------------------------------------------------------


def _failure(registry, env, graph: dict) -> tuple[str, str, str, str | None]:
    from engine.executor import Executor

    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status == "failed"
    e = outcome.error
    return e.node_id, e.node_type, e.message, e.input_name


def test_a_video_model_is_refused_by_name(registry, env, root):
    """Kandinsky 5's video and image-editing models read 2C+1 channels per cell (visual conditioning)."""
    from flow_family_files import save_state

    state = tiny_kandinsky5.transformer_state()
    state["visual_embeddings.in_layer.weight"] = torch.zeros(tiny_kandinsky5.MODEL, 4 * 33)
    save_state(root / "diffusion_models" / "tiny-kandinsky5-video.safetensors", state)
    node, kind, message, name = _failure(registry, env, _graph(PROMPT, NEGATIVE, 1, 2, 3.5,
                                                               unet="tiny-kandinsky5-video.safetensors"))
    assert (node, kind, name) == ("1", "UNETLoader", "unet_name")
    assert "video or image-editing model" in message and "text to image" in message


@pytest.mark.parametrize("loader,wanted", [
    ({"clip_name1": CLIP_L}, "type 'kandinsky5_image' needs Qwen2.5-VL + CLIP-L, got tiny-clip_l"),
    ({"type": "flux"}, "type 'flux' needs CLIP-L + T5-XXL, got tiny-qwen_2.5_vl.safetensors (Qwen2.5-VL)"),
], ids=["two-clip_l", "type-flux"])
def test_wrong_text_encoders_or_type_are_named_at_the_loader(registry, env, loader, wanted):
    graph = _graph(PROMPT, NEGATIVE, 1, 2, 3.5)
    graph["8"]["inputs"].update(loader)
    node, kind, message, name = _failure(registry, env, graph)
    assert (node, kind, name) == ("8", "DualCLIPLoader", "clip_name1") and wanted in message


def test_a_flux_transformer_in_the_kandinsky5_graph_is_named_at_the_sampler(registry, env, root):
    """Another family's diffusion model (FLUX.1) with Kandinsky 5's conditioning: the prompt's width is refused
    naming the input, not a matrix-shape failure inside the network."""
    import tiny_flux
    from flow_family_files import save_state

    save_state(root / "diffusion_models" / "tiny-flux.safetensors", tiny_flux.bfl_transformer("dev"))
    node, kind, message, name = _failure(registry, env, _graph(PROMPT, NEGATIVE, 1, 2, 3.5,
                                                               unet="tiny-flux.safetensors"))
    assert (node, kind) == ("5", "KSampler") and name in ("positive", "negative")
    assert f"{tiny_qwen_image.TEXT} wide" in message and "FLUX" in message and "DualCLIPLoader type flux" in message


def test_conditioning_of_another_family_is_named_at_the_sampler(registry, env):
    """Qwen-Image's conditioning (CLIPLoader type qwen_image on the same Qwen file) has the width but no
    CLIP-L pooled output."""
    graph = _graph(PROMPT, NEGATIVE, 1, 2, 3.5)
    graph["8"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": QWEN, "type": "qwen_image"}}
    node, kind, message, name = _failure(registry, env, graph)
    assert (node, kind) == ("5", "KSampler") and name in ("positive", "negative")
    assert "pooled output" in message and "kandinsky5_image" in message
