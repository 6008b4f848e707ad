"""The HunyuanImage 2.1 refiner on a tiny random model, from ComfyUI's split files through the real loaders,
against diffusers' HunyuanImageRefinerPipeline.

The tiny refiner (tests/tiny_hunyuan_image_refiner.py) is written as ComfyUI's files: the transformer in
Tencent's original layout (bare, under ``model.diffusion_model.``, and in diffusers' names), the refiner VAE
in diffusers' and Tencent's names, the base model's Qwen2.5-VL and ByT5 files. ComfyUI's graph (UNETLoader,
DualCLIPLoader type hunyuan_image, VAELoader, LoadImage, VAEEncode, CLIPTextEncode, FluxGuidance,
HunyuanRefinerLatent, KSampler euler/simple at cfg 1 or SamplerCustomAdvanced, VAEDecode) equals the
pipeline's image within 1/255, the pipeline handed Kiln's seeded noise, the picture's latent from Kiln's
VAEEncode and a generator seeded as Kiln's augmentation noise (noise_augmentation 0.25, the pipeline's fixed
strength).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_hunyuan_image_refiner as tiny
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint.load import CheckpointError
from nodes.families import hunyuan_image, hunyuan_image_refiner as refiner

PROMPT = "a red bicycle leaning on a stone wall"
#: Another prompt, long enough to move the toy model (its text reaches the image through attention alone).
OTHER_PROMPT = "neon city street at night, rain, reflections, many people with umbrellas, taxis, steam rising"
SIZE = tiny.SIZE
UNET, QWEN, BYT5, VAE = ("tiny-hunyuanimage2.1-refiner.safetensors", "tiny-qwen_2.5_vl_7b.safetensors",
                         "tiny-byt5_small_glyphxl.safetensors", "tiny-hunyuan_image_refiner_vae.safetensors")
#: The pipeline's fixed augmentation (``prepare_latents``' strength), given to HunyuanRefinerLatent.
AUGMENT = 0.25

root = models_root(tiny.make_models_folder, "hunyuan-image-refiner-models")


def picture() -> "Any":
    """A smooth colour picture, SIZE x SIZE (PIL)."""
    from PIL import Image

    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _graph(prompt: str, seed: int, steps: int, guidance: float, unet: str = UNET, augment: float = AUGMENT,
           custom: bool = False) -> dict:
    """ComfyUI's API-format refiner graph: the picture encoded, refined under the prompt, decoded; ``custom``:
    sampled by ComfyUI's custom-sampling nodes (BasicGuider, KSamplerSelect euler, BasicScheduler simple,
    RandomNoise, SamplerCustomAdvanced) instead of KSampler."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": QWEN, "clip_name2": BYT5,
                                                         "type": "hunyuan_image", "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "picture.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["3", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
        "7": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": guidance}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "9": {"class_type": "HunyuanRefinerLatent", "inputs": {"positive": ["7", 0], "negative": ["8", 0],
                                                               "latent": ["5", 0], "noise_augmentation": augment}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["9", 0], "negative": ["9", 1],
                                                    "latent_image": ["9", 2], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "refined"}},
    }
    if custom:
        graph |= {
            "13": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["9", 0]}},
            "14": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "15": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": steps,
                                                              "denoise": 1.0}},
            "16": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["16", 0], "guider": ["13", 0],
                                                                     "sampler": ["14", 0], "sigmas": ["15", 0],
                                                                     "latent_image": ["9", 2]}},
        }
    return graph


def kiln(registry, env, prompt: str = PROMPT, seed: int = 3, steps: int = 3, guidance: float = 3.25,
         unet: str = UNET, augment: float = AUGMENT,
         custom: bool = False) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Kiln's refined image [1, H, W, 3], the picture's latent VAEEncode made and the sampled latent."""
    picture().save(env.paths.input.root / "picture.png")
    outcome = run(registry, env, parse(_graph(prompt, seed, steps, guidance, unet, augment, custom)))
    return (outcome.results["11"][0].numpy(), outcome.results["5"][0]["samples"],
            outcome.results["10"][0]["samples"])


def reference(latent: torch.Tensor, prompt: str = PROMPT, seed: int = 3, steps: int = 3,
              guidance: float = 3.25) -> np.ndarray:
    """The pipeline's image: Kiln's seeded noise as ``latents``, Kiln's picture latent in model space as
    ``image``, and a generator seeded as Kiln's augmentation noise (its first draw, the latents given)."""
    cells = SIZE // 16
    noise = torch.randn((1, 64, cells, cells), generator=torch.Generator("cpu").manual_seed(seed))
    image = refiner.REFINER_LATENT.to_model(latent).unsqueeze(2)
    generator = torch.Generator("cpu").manual_seed(refiner.AUGMENT_SEED)
    with torch.no_grad():
        return tiny.pipeline()(prompt=prompt, image=image, height=SIZE, width=SIZE, num_inference_steps=steps,
                               distilled_guidance_scale=guidance, latents=noise.unsqueeze(2), generator=generator,
                               output_type="np").images


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET, "tiny-hunyuanimage2.1-refiner-prefixed.safetensors",
                                  "tiny-hunyuanimage2.1-refiner-diffusers-keys.safetensors"])
def test_unet_loader_loads_the_refiner_as_its_family_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is refiner.FAMILY and model.scheduler_config["shift"] == refiner.SHIFT
    assert model.latent is refiner.REFINER_LATENT
    want = tiny.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
        assert tuple(net.config.patch_size) == (1, 1, 1) and tuple(net.config.rope_axes_dim) == (4, 14, 14)
        assert net.config.guidance_embeds and net.context_embedder_2 is None
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_the_text_to_image_model_stays_its_own_family(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-hunyuanimage2.1.safetensors")
    assert model.family is hunyuan_image.FAMILY


def test_a_refiner_file_with_a_stray_key_names_the_file_and_the_key(env, root):
    from flow_family_files import save_state

    state = dict(tiny.transformer_state())
    state["double_blocks.0.img_attn_extra.weight"] = torch.zeros(2)
    save_state(root / "diffusion_models" / "stray-refiner.safetensors", state)
    with pytest.raises(Exception) as exc:
        call(split_loaders.unet_loader, env, unet_name="stray-refiner.safetensors")
    assert "stray-refiner" in str(exc.value) and "img_attn_extra" in str(exc.value)


def test_vae_loader_reads_the_refiner_vae_in_the_stacked_layout(env):
    (vae,) = call(loaders.vae_loader, env, vae_name=VAE)
    assert (vae.latent_channels, vae.downscale) == (64, 16)
    want = tiny.components()["vae"].state_dict()
    with vae.module() as module:
        got = module.vae.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    pixels = torch.from_numpy(np.asarray(picture(), dtype=np.float32) / 255.0)[None]
    latent = vae.encode(pixels)
    with torch.no_grad():
        mean = tiny.components()["vae"].encode(pixels.permute(0, 3, 1, 2).unsqueeze(2) * 2 - 1).latent_dist.mean
    assert torch.allclose(latent, torch.cat([mean[:, :, 0]] * 2, dim=1), atol=1e-5)


def test_the_same_tensors_in_tencents_names_are_hunyuan_video15s_vae(env):
    """ComfyUI tells HunyuanVideo 1.5's VAE by its causal convolutions' inner ``.conv`` in Tencent's names (the
    refiner's released VAE has plain convolutions); those tensors code one frame in 32 channels, not stacked."""
    (vae,) = call(loaders.vae_loader, env, vae_name="tiny-hunyuan_image_refiner_vae-original.safetensors")
    assert (vae.latent_channels, vae.downscale) == (32, 16)
    with vae.module() as module:
        assert type(module.vae).__name__ == "AutoencoderKLHunyuanVideo15"


def test_a_truncated_or_stray_refiner_vae_is_refused_naming_the_file_and_the_key(env, root):
    from flow_family_files import save_state

    full = {k: v.contiguous() for k, v in tiny.components()["vae"].state_dict().items()}
    state = {k: v for k, v in full.items() if not k.startswith("encoder.conv_in")}
    save_state(root / "vae" / "broken-refiner-vae.safetensors", state)
    with pytest.raises(Exception) as exc:
        call(loaders.vae_loader, env, vae_name="broken-refiner-vae.safetensors")
    assert "broken-refiner-vae" in str(exc.value) and "encoder.conv_in" in str(exc.value)
    state = full | {"decoder.up_blocks.0.extra.weight": torch.zeros(2)}
    save_state(root / "vae" / "stray-refiner-vae.safetensors", state)
    with pytest.raises(Exception) as exc:
        call(loaders.vae_loader, env, vae_name="stray-refiner-vae.safetensors")
    assert "stray-refiner-vae" in str(exc.value) and "decoder.up_blocks.0.extra" in str(exc.value)


# -- conditioning ---------------------------------------------------------------------------------------


def test_conditioning_equals_the_refiner_pipelines_encode_prompt(env):
    """CLIPTextEncode's conditioning carries the prompt in the refiner's template beside the base one; the
    refiner family's own encoding is the same; neither reads ByT5."""
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=QWEN, clip_name2=BYT5, type="hunyuan_image")
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    [[base_states, extra]] = clip.encode('a "quoted" sign')
    [[own, own_extra]] = model.family.encode_text(clip, 'a "quoted" sign')
    with torch.no_grad():
        theirs, mask = tiny.pipeline().encode_prompt('a "quoted" sign', device=torch.device("cpu"))
    want = theirs[0][mask[0].bool()]
    for ours in (extra[hunyuan_image.REFINER_TEXT][0], own[0]):
        assert ours.shape == want.shape and torch.allclose(ours, want, atol=1e-5, rtol=1e-5)
    assert base_states.shape[1] != want.shape[0]  # the base template's states are other ones
    assert hunyuan_image.BYT5 not in own_extra and hunyuan_image.REFINER_TEXT not in own_extra


# -- sampling -------------------------------------------------------------------------------------------


def test_the_refiner_graph_equals_the_pipeline_and_seed_prompt_and_guidance_matter(registry, env):
    ours, latent, sampled = kiln(registry, env)
    theirs = reference(latent)
    gap = float(np.abs(ours - theirs).max())
    print(f"refiner graph vs HunyuanImageRefinerPipeline: max |diff| {gap:.2e}")
    assert gap <= 1 / 255
    scale = float(sampled.abs().max())
    for name, kwargs in (("seed", {"seed": 4}), ("prompt", {"prompt": OTHER_PROMPT}),
                         ("guidance", {"guidance": 8.0}), ("noise_augmentation", {"augment": 0.1})):
        other, _, other_sampled = kiln(registry, env, **kwargs)
        change, latent_change = float(np.abs(other - ours).max()), float((other_sampled - sampled).abs().max())
        print(f"{name} changes the image by {change:.4f}, the latent by {latent_change / scale:.3f} of its range")
        # each moves the image by over five times the tolerance and the latent by a clear part of its range
        assert change > 5 / 255 and latent_change > 0.03 * scale, name


def test_sampler_custom_advanced_equals_the_pipeline_too(registry, env):
    ours, latent, _ = kiln(registry, env, custom=True)
    gap = float(np.abs(ours - reference(latent)).max())
    print(f"SamplerCustomAdvanced vs HunyuanImageRefinerPipeline: max |diff| {gap:.2e}")
    assert gap <= 1 / 255


def test_the_picture_reaches_the_network(registry, env):
    """The refined image follows the picture given: a blank picture latent gives another image."""
    ours, latent, _ = kiln(registry, env)
    theirs_blank = reference(torch.zeros_like(latent))
    assert float(np.abs(ours - theirs_blank).max()) > 10 / 255


def test_without_the_refiner_latent_node_sampling_says_what_to_connect(registry, env):
    from engine.executor import Executor

    graph = _graph(PROMPT, 3, 2, 3.25)
    graph["10"]["inputs"].update(positive=["7", 0], negative=["8", 0], latent_image=["5", 0])
    picture().save(env.paths.input.root / "picture.png")
    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status == "failed" and "HunyuanRefinerLatent" in outcome.error.message
