"""HunyuanVideo 1.5 (Capybara's architecture) making pictures, on a tiny random model, from ComfyUI's split
files through the real loaders, against HunyuanVideo15Pipeline at num_frames=1.

The tiny model (tests/tiny_hunyuan_video15.py) is written as ComfyUI's files: the transformer in Tencent's
original layout (bare, under ``model.diffusion_model.``, and in diffusers' names), HunyuanImage 2.1's tiny
Qwen2.5-VL and ByT5 files (the same encoders, DualCLIPLoader type hunyuan_video_15), the VAE in Tencent's
names. The Capybara text-to-image template's graph (UNETLoader, ModelSamplingSD3, CFGGuider, BasicScheduler
simple, KSamplerSelect euler, RandomNoise, EmptyHunyuanVideo15Latent of one frame, SamplerCustomAdvanced,
VAEDecode) equals the pipeline's image within 1/255, the pipeline handed Kiln's seeded noise as its one-frame
latents, ClassifierFreeGuidance at the cfg and FlowMatchEuler at the shift.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_hunyuan_video15 as tiny
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.families import hunyuan_video15

PROMPT = 'a capybara holding a sign that says "HELLO" in a garden'
NEGATIVE = "blurry, low quality"
SIZE = tiny.SIZE
UNET, QWEN, BYT5, VAE = ("tiny-hunyuanvideo15.safetensors", "tiny-qwen_2.5_vl_7b.safetensors",
                         "tiny-byt5_small_glyphxl.safetensors", "tiny-hunyuanvideo15_vae.safetensors")

root = models_root(tiny.make_models_folder, "hunyuan-video15-models")


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, shift: float, unet: str = UNET,
           length: int = 1) -> dict:
    """The Capybara text-to-image template's graph in ComfyUI's API format (its subgraph's nodes)."""
    return {
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": QWEN, "clip_name2": BYT5,
                                                          "type": "hunyuan_video_15", "device": "default"}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "67": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["12", 0], "shift": shift}},
        "44": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["11", 0]}},
        "93": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["11", 0]}},
        "91": {"class_type": "CFGGuider", "inputs": {"model": ["67", 0], "positive": ["44", 0],
                                                     "negative": ["93", 0], "cfg": cfg}},
        "17": {"class_type": "BasicScheduler", "inputs": {"model": ["67", 0], "scheduler": "simple", "steps": steps,
                                                          "denoise": 1.0}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "111": {"class_type": "EmptyHunyuanVideo15Latent", "inputs": {"width": SIZE, "height": SIZE,
                                                                      "length": length, "batch_size": 1}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["91", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["111", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
        "102": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "capybara"}},
    }


def reference(prompt: str, negative: str, seed: int, steps: int, cfg: float, shift: float) -> np.ndarray:
    """HunyuanVideo15Pipeline's one frame from Kiln's seeded noise ([1, 32, h, w] from one CPU generator, as
    the pipeline's [1, 32, 1, h, w] latents), as an image [1, H, W, 3]."""
    cells = SIZE // 16
    noise = torch.randn((1, 32, cells, cells), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        video = tiny.pipeline(cfg, shift)(prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE,
                                          num_frames=1, num_inference_steps=steps, latents=noise.unsqueeze(2),
                                          output_type="np").frames
    return np.asarray(video)[:, 0]


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET, "tiny-hunyuanvideo15-prefixed.safetensors",
                                  "tiny-hunyuanvideo15-diffusers-keys.safetensors"])
def test_unet_loader_detects_hunyuan_video15_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is hunyuan_video15.FAMILY and model.scheduler_config["shift"] == hunyuan_video15.SHIFT
    want = tiny.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
        assert (net.config.in_channels, net.config.num_layers, net.config.image_embed_dim) == (65, 2, tiny.IMAGE_WIDTH)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_hunyuan_image_does_not_claim_a_hunyuan_video15_file():
    from nodes.checkpoint import hunyuan_image_load
    from nodes.families import for_unet

    state = tiny.transformer_state()
    assert not hunyuan_image_load.has_transformer(state)
    assert hunyuan_image_load.has_transformer(__import__("tiny_hunyuan_image").transformer_state())
    assert for_unet({k: tuple(v.shape) for k, v in state.items()}) is hunyuan_video15.FAMILY


@pytest.mark.parametrize("change,wanted", [
    (lambda s: s.update({"double_blocks.0.img_attn_bogus.weight": torch.zeros(2)}),
     "'double_blocks.0.img_attn_bogus.weight'"),
    (lambda s: s.pop("double_blocks.1.img_mlp.fc2.weight"), "transformer_blocks.1.ff.net.2.weight"),
], ids=["unexpected", "missing"])
def test_a_key_mismatch_names_the_file_the_family_and_the_key(registry, env, root, change, wanted):
    from engine.executor import Executor
    from flow_family_files import save_state

    state = tiny.transformer_state()
    change(state)
    save_state(root / "diffusion_models" / "tiny-hv15-bad.safetensors", state)
    outcome = Executor(registry, env).run(parse(_graph(PROMPT, NEGATIVE, 1, 2, 4.0, 7.0,
                                                       unet="tiny-hv15-bad.safetensors")))
    assert outcome.status == "failed"
    e = outcome.error
    assert (e.node_id, e.node_type, e.input_name) == ("12", "UNETLoader", "unet_name")
    assert "tiny-hv15-bad" in e.message and "HunyuanVideo 1.5" in e.message and wanted in e.message, e.message


def test_vae_loader_reads_the_original_layout_and_codes_one_frame(env):
    from nodes import loaders

    (vae,) = call(loaders.vae_loader, env, vae_name=VAE)
    assert (vae.latent_channels, vae.downscale) == (32, 16)
    theirs = tiny.components()["vae"]
    with vae.module() as module:
        got = module.vae.state_dict()
        assert type(module.vae).__name__ == "AutoencoderKLHunyuanVideo15"
        z = torch.randn(1, 32, 2, 3, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            picture = module.decode(z).sample
            frame = theirs.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0]
            assert picture.shape == (1, 3, 32, 48) and torch.equal(picture, frame)
            mean = module.encode(picture.clamp(-1, 1)).latent_dist.mean
            assert torch.equal(mean, theirs.encode(picture.clamp(-1, 1).unsqueeze(2)).latent_dist.mean[:, :, 0])
    want = theirs.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_dual_clip_loader_type_hunyuan_video_15_builds_qwen25_vl_and_byt5_in_either_order(env):
    for first, second in ((QWEN, BYT5), (BYT5, QWEN)):
        (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=first, clip_name2=second,
                       type="hunyuan_video_15")
        assert clip.family is hunyuan_video15.FAMILY


# -- conditioning ---------------------------------------------------------------------------------------


def test_the_template_and_system_message_are_the_pipelines():
    pipe = tiny.pipeline(4.0, 7.0)
    assert hunyuan_video15.SYSTEM == pipe.system_message
    assert (hunyuan_video15.TEMPLATE_TOKENS, hunyuan_video15.MAX_TOKENS, hunyuan_video15.BYT5_TOKENS) == (
        pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length, pipe.tokenizer_2_max_length)
    chat = pipe.tokenizer.apply_chat_template([[{"role": "system", "content": pipe.system_message},
                                                {"role": "user", "content": "a cat"}]],
                                              add_generation_prompt=True, tokenize=False)[0]
    assert chat == hunyuan_video15.TEMPLATE.format("a cat")


@pytest.mark.parametrize("prompt", [PROMPT, "a plain prompt", "", '"A" and “中” and "A" again'],
                         ids=["quoted", "unquoted", "empty", "repeated-quotes"])
def test_conditioning_equals_the_pipelines_encode_prompt(env, prompt):
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=QWEN, clip_name2=BYT5, type="hunyuan_video_15")
    [[ours, extra]] = clip.encode(prompt)
    with torch.no_grad():
        qwen, qmask, byt5, bmask = tiny.pipeline(4.0, 7.0).encode_prompt(prompt, device=torch.device("cpu"))
    valid = qmask[0].bool()
    assert ours.shape[1] == int(valid.sum()) and torch.allclose(ours[0], qwen[0][valid], atol=1e-5, rtol=1e-5)
    glyph = hunyuan_video15.glyph_text(prompt)
    assert glyph == extract_glyph_texts(prompt)
    if glyph is None:
        assert hunyuan_video15.BYT5 not in extra and not bmask.any()
    else:
        theirs = byt5[0][bmask[0].bool()]
        assert extra[hunyuan_video15.BYT5].shape[1] == theirs.shape[0] == len(glyph.encode()) + 1
        assert torch.allclose(extra[hunyuan_video15.BYT5][0], theirs, atol=1e-5, rtol=1e-5)


# -- sampling ---------------------------------------------------------------------------------------------


def test_the_template_graph_equals_hunyuan_video15_pipeline_at_one_frame_and_seed_and_prompt_matter(registry, env):
    """cfg 6 with a negative, shift 7 (the template's values), 3 steps: the pipeline's CFG 6 on FlowMatchEuler
    shift 7, num_frames 1."""
    ours = run(registry, env, parse(_graph(PROMPT, NEGATIVE, 3, 3, 6.0, 7.0))).results["8"][0].numpy()
    theirs = reference(PROMPT, NEGATIVE, 3, 3, 6.0, 7.0)
    gap = np.abs(ours - theirs).max()
    print(f"hunyuan_video15 gap {gap * 255:.5f}/255")
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3) and gap <= 1 / 255, gap
    other_seed = run(registry, env, parse(_graph(PROMPT, NEGATIVE, 4, 3, 6.0, 7.0))).results["8"][0].numpy()
    other_prompt = run(registry, env, parse(_graph("a red fox in deep snow at night", NEGATIVE, 3, 3, 6.0, 7.0)))
    other_prompt = other_prompt.results["8"][0].numpy()
    seed_gap, prompt_gap = np.abs(ours - other_seed).max(), np.abs(ours - other_prompt).max()
    print(f"seed changes {seed_gap * 255:.2f}/255, prompt changes {prompt_gap * 255:.2f}/255")
    assert seed_gap > 10 * gap + 0.01 and prompt_gap > 10 * gap + 0.01  # not vacuous


def test_a_video_length_is_refused_naming_the_input(registry, env):
    from engine.executor import Executor

    outcome = Executor(registry, env).run(parse(_graph(PROMPT, NEGATIVE, 1, 2, 6.0, 7.0, length=25)))
    assert outcome.status == "failed"
    e = outcome.error
    assert (e.node_id, e.node_type, e.input_name) == ("111", "EmptyHunyuanVideo15Latent", "length")
    assert "7 latent frames" in e.message


# -- a picture to edit (HunyuanVideo15ImageToVideo) ---------------------------------------------------------


def _picture(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _edit_graph(image: str, prompt: str, seed: int, steps: int, cfg: float, shift: float,
                vision: bool = True) -> dict:
    """The Capybara image-edit template's conditioning in API format: LoadImage, CLIPVisionLoader (SigLIP),
    CLIPVisionEncode (crop none), HunyuanVideo15ImageToVideo (length 1) into the text-to-image graph."""
    graph = _graph(prompt, NEGATIVE, seed, steps, cfg, shift)
    del graph["111"]
    graph |= {
        "80": {"class_type": "LoadImage", "inputs": {"image": image}},
        "81": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny-sigclip.safetensors"}},
        "79": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["81", 0], "image": ["80", 0],
                                                            "crop": "none"}},
        "78": {"class_type": "HunyuanVideo15ImageToVideo", "inputs": {
            "positive": ["44", 0], "negative": ["93", 0], "vae": ["10", 0], "width": SIZE, "height": SIZE,
            "length": 1, "batch_size": 1, "start_image": ["80", 0]}},
    }
    if vision:
        graph["78"]["inputs"]["clip_vision_output"] = ["79", 0]
    graph["91"]["inputs"] |= {"positive": ["78", 0], "negative": ["78", 1]}
    graph["13"]["inputs"]["latent_image"] = ["78", 2]
    return graph


def test_the_edit_graph_equals_hunyuan_video15_image_to_video_pipeline_at_one_frame(registry, env):
    """HunyuanVideo15ImageToVideo's picture latent and mask channel and CLIPVisionEncode's SigLIP states give
    HunyuanVideo15ImageToVideoPipeline's frame (the same rule: VAE mean x scaling_factor, mask 1 on the frame,
    SiglipVisionModel's last_hidden_state); another picture, or no vision states, changes it clearly more."""
    _picture().save(env.paths.input.root / "picture.png")
    _picture(1).save(env.paths.input.root / "other.png")
    prompt = "the same scene at night"
    ours = run(registry, env, parse(_edit_graph("picture.png", prompt, 3, 3, 6.0, 7.0))).results["8"][0].numpy()
    noise = torch.randn((1, 32, SIZE // 16, SIZE // 16), generator=torch.Generator("cpu").manual_seed(3))
    with torch.no_grad():
        theirs = tiny.pipeline(6.0, 7.0, edit=True)(
            image=_picture(), prompt=prompt, negative_prompt=NEGATIVE, num_frames=1,
            num_inference_steps=3, latents=noise.unsqueeze(2), output_type="np").frames
    theirs = np.asarray(theirs)[:, 0]
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    gap = np.abs(ours - theirs).max()
    print(f"hunyuan_video15 edit gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    other = run(registry, env, parse(_edit_graph("other.png", prompt, 3, 3, 6.0, 7.0))).results["8"][0].numpy()
    blind = run(registry, env, parse(_edit_graph("picture.png", prompt, 3, 3, 6.0, 7.0, vision=False)))
    text_only = run(registry, env, parse(_graph(prompt, NEGATIVE, 3, 3, 6.0, 7.0))).results["8"][0].numpy()
    gaps = [np.abs(ours - o).max() for o in (other, blind.results["8"][0].numpy(), text_only)]
    print("another picture, no vision states, text only change", [f"{g * 255:.2f}/255" for g in gaps])
    assert all(g > 10 * gap + 0.01 for g in gaps)
