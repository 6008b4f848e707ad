"""CLIPTextEncode, VAEEncode and VAEDecode against diffusers on the same weights.

The models come through the real loader from the single-file checkpoints; the
references are diffusers pipelines / AutoencoderKL built from the source components.
"""
from __future__ import annotations

import numpy as np
import pytest

import tiny_models as tm
from engine.context import NodeError
from node_call import Called, call
from nodes import loaders, text, vae

import torch  # noqa: E402

PROMPTS = ["a photo of a cat", "", "Ünïcode, punctuation!? and   spaces 123"]


def _load(env, variant, fmt="single"):
    return call(loaders.checkpoint_loader, env, ckpt_name=tm.checkpoint_name(variant, fmt))


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_clip_text_encode_equals_encode_prompt(tiny_env, variant):
    _, clip, _ = _load(tiny_env, variant)
    pipe = tm.pipeline(variant)
    for prompt in PROMPTS:
        cond = call(text.clip_text_encode, tiny_env, text=prompt, clip=clip)[0]
        assert isinstance(cond, list) and len(cond) == 1
        embeds, extra = cond[0]
        assert embeds.dtype == torch.float32 and embeds.device.type == "cpu"
        with torch.no_grad():
            if variant == "sdxl":
                ref, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
                assert torch.equal(extra["pooled_output"], pooled)
                assert embeds.shape == (1, 77, 128)
            else:
                ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
                assert extra["pooled_output"] is None
        assert torch.equal(embeds, ref), (variant, prompt)


def test_diffusers_folder_clip_matches_single_file(tiny_env):
    a = call(text.clip_text_encode, tiny_env, text="a red house", clip=_load(tiny_env, "sdxl")[1])[0]
    b = call(text.clip_text_encode, tiny_env, text="a red house", clip=_load(tiny_env, "sdxl", "diffusers")[1])[0]
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])


def test_prompts_differ_and_long_prompt_is_reported(tiny_env):
    """(What a long prompt encodes to is checked in test_prompt_encoding.py.)"""
    _, clip, _ = _load(tiny_env, "sd1")
    a = call(text.clip_text_encode, tiny_env, text="a cat", clip=clip)[0][0][0]
    b = call(text.clip_text_encode, tiny_env, text="a dog", clip=clip)[0][0][0]
    assert not torch.equal(a, b)
    rec = Called()
    call(text.clip_text_encode, tiny_env, rec, text="cat " * 100, clip=clip)
    assert any("100 tokens" in m and "2 windows of 77 tokens" in m for m in rec.messages), rec.messages
    with pytest.raises(NodeError) as err:
        call(text.clip_text_encode, tiny_env, text="x", clip="not a clip")
    assert err.value.input_name == "clip"


def _image(h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_vae_encode_decode_equal_autoencoderkl(tiny_env, variant):
    _, _, handle = _load(tiny_env, variant)
    ref = tm.components(variant)["vae"]
    pixels = _image()
    latent = call(vae.vae_encode, tiny_env, pixels=pixels, vae=handle)[0]
    with torch.no_grad():
        dist = ref.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist
    assert latent["samples"].shape == (1, 4, 8, 8)
    assert torch.equal(latent["samples"], dist.mean)

    image = call(vae.vae_decode, tiny_env, samples=latent, vae=handle)[0]
    pipe = tm.pipeline(variant)
    with torch.no_grad():
        decoded = ref.decode(dist.mean).sample
    expected = pipe.image_processor.postprocess(decoded, output_type="np")
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert np.array_equal(image.numpy(), expected)


def test_vae_encode_matches_pipeline_preprocessing(tiny_env):
    """An 8-bit image through diffusers' VaeImageProcessor gives the same latent as IMAGE -> VAEEncode."""
    from PIL import Image

    _, _, handle = _load(tiny_env, "sd1")
    arr = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    pixels = torch.from_numpy(arr.astype(np.float32) / 255.0)[None]
    ours = call(vae.vae_encode, tiny_env, pixels=pixels, vae=handle)[0]["samples"]
    pipe = tm.pipeline("sd1")
    with torch.no_grad():
        x = pipe.image_processor.preprocess(Image.fromarray(arr))
        ref = pipe.vae.encode(x).latent_dist.mean
    assert torch.equal(ours, ref)


def test_vae_batch_and_standalone_vae(tiny_env):
    standalone = call(loaders.vae_loader, tiny_env, vae_name="tiny-vae.safetensors")[0]
    _, _, own = _load(tiny_env, "sd1")
    pixels = torch.cat([_image(seed=1), _image(seed=2)])
    a = call(vae.vae_encode, tiny_env, pixels=pixels, vae=standalone)[0]["samples"]
    b = call(vae.vae_encode, tiny_env, pixels=pixels, vae=own)[0]["samples"]
    single = call(vae.vae_encode, tiny_env, pixels=pixels[1:], vae=own)[0]["samples"]
    assert torch.equal(a, b) and a.shape[0] == 2
    assert torch.allclose(single[0], b[1], atol=1e-4)  # batching changes float summation order only


def test_size_rules_are_explicit(tiny_env):
    _, _, handle = _load(tiny_env, "sd1")
    odd = _image(60, 68)
    rec = Called()
    latent = call(vae.vae_encode, tiny_env, rec, pixels=odd, vae=handle)[0]
    assert latent["samples"].shape == (1, 4, 8, 9)  # 60x68 -> 64x72
    assert rec.messages == ["resized 68x60 to 72x64 (nearest multiple of 8)"] and rec.ui["text"] == rec.messages
    rec = Called()
    latent = call(vae.vae_encode, tiny_env, rec, pixels=odd, vae=handle, size_rule="crop")[0]
    assert latent["samples"].shape == (1, 4, 7, 8) and "cropped 68x60 to 64x56" in rec.messages[0]
    with pytest.raises(NodeError) as err:
        call(vae.vae_encode, tiny_env, pixels=odd, vae=handle, size_rule="reject")
    assert err.value.input_name == "pixels" and "68x60" in str(err.value)
    rec = Called()
    call(vae.vae_encode, tiny_env, rec, pixels=_image(64, 64), vae=handle)
    assert rec.messages == [] and rec.ui == {}  # a fitting size is left alone and says nothing
    with pytest.raises(NodeError, match="at least 8x8") as err:
        call(vae.vae_encode, tiny_env, pixels=_image(1, 1), vae=handle)
    assert err.value.input_name == "pixels"


def test_rgba_and_grey_images_encode(tiny_env):
    _, _, handle = _load(tiny_env, "sd1")
    rgb = _image()
    rgba = torch.cat([rgb, torch.ones(1, 64, 64, 1)], dim=-1)
    a = call(vae.vae_encode, tiny_env, pixels=rgba, vae=handle)[0]["samples"]
    b = call(vae.vae_encode, tiny_env, pixels=rgb, vae=handle)[0]["samples"]
    assert torch.equal(a, b)
    grey = call(vae.vae_encode, tiny_env, pixels=rgb[..., :1], vae=handle)[0]["samples"]
    assert grey.shape == (1, 4, 8, 8)


def test_vae_decode_rejects_bad_latents(tiny_env):
    _, _, handle = _load(tiny_env, "sd1")
    with pytest.raises(NodeError) as err:
        call(vae.vae_decode, tiny_env, samples={"samples": torch.zeros(1, 3, 8, 8)}, vae=handle)
    assert err.value.input_name == "samples" and "3 channels" in str(err.value)
    with pytest.raises(NodeError):
        call(vae.vae_decode, tiny_env, samples=torch.zeros(1, 4, 8, 8), vae=handle)
    with pytest.raises(NodeError) as err:
        call(vae.vae_decode, tiny_env, samples={"samples": torch.zeros(1, 4, 8, 8)}, vae=None)
    assert err.value.input_name == "vae"


def test_target_size_rule():
    assert vae.target_size(60, 68) == (64, 72)
    assert vae.target_size(512, 512) == (512, 512)
    assert vae.target_size(3, 11) == (8, 8)
    assert vae.target_size(12, 19) == (16, 16)
