"""Qwen-Image-Layered on a tiny random model, from ComfyUI's split files through Kiln's real loaders and
nodes (the graph of ComfyUI's image_qwen_image_layered template), against diffusers'
QwenImageLayeredPipeline; the two layer nodes' semantics; the errors for mismatched inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_qwen_image_layered as tiny
from node_call import call, environment_over
from nodes import custom_sampling, kontext, latent_layers, latent_math, loaders, sd3_nodes, split_loaders, text
from nodes import vae as vae_nodes
from nodes.sampling import ksampler

PROMPT = "a red ball in front of a wall"
NEGATIVE = "blurry"
SIZE, LAYERS, STEPS, SEED, CFG = 32, 2, 2, 7, 4.0
TOL = 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny.save_files(tmp_path_factory.mktemp("qwen-layered-models"))


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


@pytest.fixture()
def loaded(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name=tiny.FILES["unet"], weight_dtype="default")
    (clip,) = call(split_loaders.clip_loader, env, clip_name=tiny.FILES["clip"], type="qwen_image")
    (vae,) = call(loaders.vae_loader, env, vae_name=tiny.FILES["vae"])
    return model, clip, vae


def picture(seed: int) -> np.ndarray:
    """A smooth SIZE x SIZE RGB picture in 0..1, [1, H, W, 3], quantised to 8 bits."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([np.sin(3 * x + g.random() * 3), np.cos(2 * y + g.random()), x * y], -1) * 0.5 + 0.5
    return (np.round(rgb * 255) / 255).astype(np.float32)[None]


def kiln(env, loaded, pixels: np.ndarray, *, layers: int = LAYERS, sampled: list | None = None) -> torch.Tensor:
    """The template's graph: the picture's latent as ReferenceLatent on both prompts,
    ModelSamplingAuraFlow 1, the layered latent, KSampler, LatentCut t 1.., LatentCutToBatch, VAEDecode."""
    model, clip, vae = loaded
    (ref,) = call(vae_nodes.vae_encode, env, pixels=torch.from_numpy(pixels), vae=vae)
    conds = []
    for prompt in (PROMPT, NEGATIVE):
        (cond,) = call(text.clip_text_encode, env, text=prompt, clip=clip)
        conds.append(call(kontext.reference_latent, env, conditioning=cond, latent=ref)[0])
    (flat,) = call(sd3_nodes.model_sampling_aura_flow, env, model=model, shift=1.0)
    (empty,) = call(latent_layers.empty_qwen_image_layered_latent, env, width=SIZE, height=SIZE, layers=layers)
    (out,) = call(ksampler, env, model=flat, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                  scheduler="simple", positive=conds[0], negative=conds[1], latent_image=empty)
    assert out["samples"].shape == (1, 16, layers + 1, SIZE // 8, SIZE // 8)
    if sampled is not None:
        sampled.append(out["samples"])
    (cut,) = call(latent_math.latent_cut, env, samples=out, dim="t", index=1, amount=16384)
    (batch,) = call(latent_layers.latent_cut_to_batch, env, samples=cut, dim="t", slice_size=1)
    (images,) = call(vae_nodes.vae_decode, env, samples=batch, vae=vae)
    return images


def diffusers(pixels: np.ndarray, monkeypatch, *, prompt: str = PROMPT, negative: str = NEGATIVE,
              cfg: float = CFG, seed: int = SEED, scheduler=None, steps: int = STEPS) -> np.ndarray:
    """The pipeline on the same picture (RGBA, opaque) at SIZE, with Kiln's starting noise for ``seed``
    (and ``scheduler`` in place of the tiny one's unshifted scheduler when given)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as module
    from PIL import Image

    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (SIZE, SIZE))
    pipe = tiny.pipeline()
    if scheduler is not None:
        pipe.scheduler = scheduler
    rgba = np.concatenate([pixels[0], np.ones_like(pixels[0][..., :1])], -1)
    image = Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA")
    noise = torch.randn((1, 16, LAYERS + 1, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))
    packed = pipe._pack_latents(noise.permute(0, 2, 1, 3, 4), 1, 16, SIZE // 8, SIZE // 8, LAYERS + 1)
    with torch.no_grad():
        out = pipe(image=image, prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg, layers=LAYERS,
                   num_inference_steps=steps, cfg_normalize=False, latents=packed, output_type="np",
                   generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0])


def test_layers_equal_qwen_image_layered_pipeline(env, loaded, monkeypatch):
    """The template's graph decodes the same RGBA layers as QwenImageLayeredPipeline (within 1/255),
    LAYERS of them, four channels each; another picture moves the sampled layers (the picture is read)."""
    pixels, sampled = picture(1), []
    got = kiln(env, loaded, pixels, sampled=sampled)
    want = diffusers(pixels, monkeypatch)
    assert got.shape == (LAYERS, SIZE, SIZE, 4) and want.shape == got.shape
    assert float(np.abs(got.numpy() - want).max()) <= TOL
    # not vacuous: the tiny VAE flattens what it decodes, so the picture's effect is shown on the layers'
    # latents (the tiny model's sampled latents move by about 0.1 here)
    kiln(env, loaded, 1 - picture(2), sampled=sampled)
    assert float((sampled[1] - sampled[0]).abs().max()) > 0.02


def test_loader_detects_the_layered_transformer_and_rgba_vae(env, loaded, root):
    """ComfyUI's file (bare and ``model.diffusion_model.``-prefixed keys) and the pipeline's diffusers
    folder load as Qwen-Image-Layered with the layered switches, bit for bit; the VAE codes RGBA."""
    from safetensors.torch import save_file

    model, _, vae = loaded
    want = tiny.components()["transformer"].state_dict()
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in want.items()},
              str(root / "diffusion_models" / "prefixed.safetensors"))
    (prefixed,) = call(split_loaders.unet_loader, env, unet_name="prefixed.safetensors", weight_dtype="default")
    (root / "checkpoints").mkdir(exist_ok=True)
    tiny.pipeline().save_pretrained(str(root / "checkpoints" / "layered-diffusers"), safe_serialization=True)
    (folder, _, folder_vae) = call(loaders.checkpoint_loader, env, ckpt_name="layered-diffusers")
    for m in (model, prefixed, folder):
        assert m.family.name == "qwen_image_layered"
        with m.unet() as unet:
            assert unet.config.use_additional_t_cond and unet.config.use_layer3d_rope
            got = unet.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for v in (vae, folder_vae):
        assert v.decode(torch.zeros(1, 16, 2, 2)).shape[-1] == 4  # layers decode as RGBA


def test_layer_nodes_follow_comfyui(env):
    """EmptyQwenImageLayeredLatentImage: zeros [B, 16, layers + 1, h/8, w/8]. LatentCutToBatch on t: one
    latent per frame, image-major; a remainder shorter than a slice is dropped. LatentCut t cuts frames."""
    (empty,) = call(latent_layers.empty_qwen_image_layered_latent, env, width=48, height=32, layers=3, batch_size=2)
    assert empty["samples"].shape == (2, 16, 4, 4, 6) and not empty["samples"].any()
    x = torch.arange(2 * 2 * 5 * 2 * 3, dtype=torch.float32).reshape(2, 2, 5, 2, 3)
    (one,) = call(latent_layers.latent_cut_to_batch, env, samples={"samples": x}, dim="t", slice_size=1)
    assert one["samples"].shape == (10, 2, 1, 2, 3)
    assert torch.equal(one["samples"][6, :, 0], x[1, :, 1])
    (two,) = call(latent_layers.latent_cut_to_batch, env, samples={"samples": x}, dim="t", slice_size=2)
    assert two["samples"].shape == (4, 2, 2, 2, 3) and torch.equal(two["samples"][3], x[1, :, 2:4])
    (cut,) = call(latent_math.latent_cut, env, samples={"samples": x}, dim="t", index=1, amount=16384)
    assert torch.equal(cut["samples"], x[:, :, 1:])
    (cols,) = call(latent_layers.latent_cut_to_batch, env, samples={"samples": x[:, :, 0]}, dim="x", slice_size=1)
    assert cols["samples"].shape == (6, 2, 2, 1) and torch.equal(cols["samples"][4], x[1, :, 0, :, 1:2])


def test_mismatched_inputs_name_node_and_input(env, loaded, root):
    """A layered latent on plain Qwen-Image, an image latent on the layered model, no picture, a
    many-frame latent at VAEDecode, a layered latent at SamplerCustom on plain Qwen-Image, t on an image
    latent: each refused naming its input."""
    import tiny_qwen_image

    from engine.context import NodeError

    model, clip, vae = loaded
    (cond,) = call(text.clip_text_encode, env, text=PROMPT, clip=clip)
    (layered,) = call(latent_layers.empty_qwen_image_layered_latent, env, width=SIZE, height=SIZE, layers=1)
    run = dict(seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", positive=cond, negative=cond)
    with pytest.raises(NodeError, match="EmptyQwenImageLayeredLatentImage") as err:
        call(ksampler, env, model=model, latent_image={"samples": torch.zeros(1, 16, 4, 4)}, **run)
    assert err.value.input_name == "latent_image"
    with pytest.raises(NodeError, match="ReferenceLatent") as err:
        call(ksampler, env, model=model, latent_image=layered, **run)
    assert err.value.input_name == "positive"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tiny_qwen_image.components()["transformer"].state_dict().items()},
              str(root / "diffusion_models" / "plain.safetensors"))
    (plain,) = call(split_loaders.unet_loader, env, unet_name="plain.safetensors", weight_dtype="default")
    with pytest.raises(NodeError, match="layered") as err:
        call(ksampler, env, model=plain, latent_image=layered, **run)
    assert err.value.input_name == "latent_image"
    with pytest.raises(NodeError, match="LatentCutToBatch") as err:
        call(vae_nodes.vae_decode, env, samples=layered, vae=vae)
    assert err.value.input_name == "samples"
    with pytest.raises(NodeError, match="layered") as err:  # the custom samplers refuse as KSampler does
        call(custom_sampling.sampler_custom, env, model=plain, add_noise=True, noise_seed=1, cfg=1.0, positive=cond,
             negative=cond, sampler=call(custom_sampling.ksampler_select, env, sampler_name="euler")[0],
             sigmas=torch.tensor([1.0, 0.0]), latent_image=layered)
    assert err.value.input_name == "latent_image"
    with pytest.raises(NodeError, match="no time/layer axis") as err:
        call(latent_layers.latent_cut_to_batch, env, samples={"samples": torch.zeros(1, 16, 4, 4)}, dim="t",
             slice_size=1)
    assert err.value.input_name == "dim"


def test_a_batch_samples_each_image_as_alone(env, loaded):
    """batch_size 2: image 0 equals the one-image run with the same seed (the folded noise is drawn per
    image at the layered shape)."""
    model, clip, vae = loaded
    (ref,) = call(vae_nodes.vae_encode, env, pixels=torch.from_numpy(picture(1)), vae=vae)
    (cond,) = call(text.clip_text_encode, env, text=PROMPT, clip=clip)
    (cond,) = call(kontext.reference_latent, env, conditioning=cond, latent=ref)
    run = dict(seed=5, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", positive=cond, negative=cond)
    outs = []
    for batch in (2, 1):
        (empty,) = call(latent_layers.empty_qwen_image_layered_latent, env, width=SIZE, height=SIZE, layers=LAYERS,
                        batch_size=batch)
        outs.append(call(ksampler, env, model=model, latent_image=empty, **run)[0]["samples"])
    assert outs[0].shape == (2, 16, LAYERS + 1, SIZE // 8, SIZE // 8)
    assert float((outs[0][:1] - outs[1]).abs().max()) < 1e-4
    assert float((outs[0][1] - outs[0][0]).abs().max()) > 0.01  # the second image has its own noise
