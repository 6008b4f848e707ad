"""JoyImage Edit on a tiny random model, from ComfyUI's split files through Kiln's real loaders and nodes,
against diffusers' JoyImageEditPipeline.

The tiny model (tests/tiny_joyimage.py) is saved as ComfyUI's files: the transformer (bare, prefixed,
diffusers' names, int8_convrot), the Qwen3-VL text encoder with its vision tower under ``visual.``, the
Wan 2.1 VAE. Kiln runs TextEncodeJoyImageEdit for the prompt and the empty negative (each with the
picture and the VAE, as ComfyUI's template wires them) and KSampler with cfg; diffusers runs the
pipeline from the same picture with guidance_scale. The decoded images agree within 1/255 per pixel,
and the picture and the prompt each move the result. Sizes come from toy buckets
(tiny_joyimage.small_buckets) instead of the release's 512..2048 ones.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_joyimage
from flow_family_files import env, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import loaders, split_loaders
from nodes.families import flux_references, joyimage
from nodes.joyimage_nodes import text_encode_joyimage_edit
from nodes.sampling import ksampler

PROMPT = "turn the sky purple"
UNET, CLIP, VAE = ("tiny-joyimage.safetensors", "tiny-qwen3vl_8b_joyimage.safetensors",
                   "tiny-wan_2.1_vae.safetensors")
TOL = 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from test_int8_quant import quantise_int8

    root = tiny_joyimage.make_models_folder(tmp_path_factory.mktemp("joyimage-models"))
    from test_scaled_fp8 import quantise

    int8, twin = quantise_int8(tiny_joyimage.transformer_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "tiny-joyimage-int8_convrot.safetensors", int8)
    save_state(root / "diffusion_models" / "tiny-joyimage-int8-dequant.safetensors", twin)
    scaled, plain = quantise(tiny_joyimage.transformer_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "tiny-joyimage-fp8_scaled.safetensors", scaled)
    save_state(root / "diffusion_models" / "tiny-joyimage-fp8-dequant.safetensors", plain)
    return root


@pytest.fixture(autouse=True)
def small(monkeypatch):
    tiny_joyimage.small_buckets(monkeypatch)


@pytest.fixture()
def loaded(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET, weight_dtype="default")
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="joyimage")
    (vae,) = call(loaders.vae_loader, env, vae_name=VAE)
    return model, clip, vae


def image_of(picture) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]


def kiln(env, loaded, picture, *, prompt: str = PROMPT, seed: int = 5, steps: int = 2, cfg: float = 4.0,
         model=None) -> np.ndarray:
    """ComfyUI's template graph: TextEncodeJoyImageEdit for the prompt and the empty negative (the picture
    and the VAE on both), an empty latent of the picture's bucket, KSampler euler/normal, VAEDecode."""
    base, clip, vae = loaded
    image = {"images.image0": image_of(picture)}
    (pos,) = call(text_encode_joyimage_edit, env, clip=clip, prompt=prompt, vae=vae, **image)
    (neg,) = call(text_encode_joyimage_edit, env, clip=clip, prompt="", vae=vae, **image)
    h, w = joyimage.bucket(picture.size[1], picture.size[0])
    latent = {"samples": torch.zeros(1, 16, h // 8, w // 8)}
    (out,) = call(ksampler, env, model=model or base, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent)
    return vae.decode(out["samples"]).numpy()


def diffusers(picture, *, prompt: str = PROMPT, seed: int = 5, steps: int = 2, cfg: float = 4.0,
              pipe=None) -> np.ndarray:
    pipe = pipe or tiny_joyimage.pipeline()
    with torch.no_grad():
        return pipe(image=picture, prompt=prompt, num_inference_steps=steps, guidance_scale=cfg, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images


# -- loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET, "tiny-joyimage-prefixed.safetensors",
                                  "tiny-joyimage-diffusers-keys.safetensors"])
def test_unet_loader_detects_joyimage_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is joyimage.FAMILY and model.scheduler_config["shift"] == 1.5
    want = tiny_joyimage.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
        assert net.config.rope_dim_list == tiny_joyimage.ROPE
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_clip_loader_joyimage_builds_qwen3_vl_with_its_vision_tower(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="joyimage")
    assert clip.family is joyimage.FAMILY
    want = tiny_joyimage.components()["text_encoder"].model.language_model.state_dict()
    with clip.encoder("text_encoder") as qwen:
        assert type(qwen).__name__ == "Qwen3VLModel"
        got = qwen.language_model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_int8_convrot_transformer_equals_comfy_kitchens_dequantisation(env):
    from test_int8_quant import _compare

    from nodes.runtime.fp8 import rotation_group

    (a,) = call(split_loaders.unet_loader, env, unet_name="tiny-joyimage-int8_convrot.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="tiny-joyimage-int8-dequant.safetensors")
    assert a.family is joyimage.FAMILY
    with a.unet() as x, b.unet() as y:
        layers = _compare(x, y)
    assert len(layers) >= 8 and any(rotation_group(m) for m in layers)  # the blocks' linears, rotated


def test_fp8_scaled_transformer_equals_its_dequantised_twin(env):
    from test_scaled_fp8 import _compare

    (a,) = call(split_loaders.unet_loader, env, unet_name="tiny-joyimage-fp8_scaled.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="tiny-joyimage-fp8-dequant.safetensors")
    assert a.family is joyimage.FAMILY
    with a.unet() as x, b.unet() as y:
        layers, fp8_bytes = _compare(x, y)
    assert layers >= 8 and fp8_bytes > 0  # the blocks' linears, held in fp8 with their scales


# -- conditioning ----------------------------------------------------------------------------------------


def test_conditioning_equals_the_pipelines_encoders(env):
    """Text alone = JoyImageEditPipeline.encode_prompt; with a picture (bucketed, read by the vision tower)
    = encode_prompt_multiple_images. Not vacuous: another picture gives other states."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="joyimage")
    pipe = tiny_joyimage.pipeline()
    [[ours, _]] = clip.encode(PROMPT)
    with torch.no_grad():
        theirs, mask = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    assert bool(mask.all()) and ours.shape == theirs.shape
    assert torch.allclose(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    picture = joyimage.bucketed(tiny_joyimage.picture(0, 120, 72))
    assert picture.size == (96, 64)
    [[seen, _]] = joyimage.encode_pictures(clip, PROMPT, [picture])
    with torch.no_grad():
        want, _ = pipe.encode_prompt_multiple_images(PROMPT, device=torch.device("cpu"), images=picture)
    assert seen.shape == want.shape and seen.shape[1] > ours.shape[1]
    assert torch.allclose(seen, want.float(), atol=1e-5, rtol=1e-5)
    [[other, _]] = joyimage.encode_pictures(clip, PROMPT, [joyimage.bucketed(tiny_joyimage.picture(1, 120, 72))])
    assert (other - seen).abs().max() > 1e-3


# -- the edit --------------------------------------------------------------------------------------------


def test_edit_equals_joyimage_edit_pipeline(env, loaded):
    """TextEncodeJoyImageEdit + KSampler (cfg 4) = JoyImageEditPipeline (guidance_scale 4, its channel-norm
    rescale) within 1/255. Not vacuous: another picture, or another prompt, moves the image."""
    picture = tiny_joyimage.picture(0, 120, 72)
    ours = kiln(env, loaded, picture)
    theirs = diffusers(picture)
    gap = float(np.abs(ours - theirs).max())
    print(f"edit gap {gap * 255:.5f}/255")
    assert ours.shape == theirs.shape == (1, 64, 96, 3) and gap <= TOL
    assert np.abs(ours - kiln(env, loaded, tiny_joyimage.picture(1, 120, 72))).max() > 0.02  # the picture matters
    assert np.abs(ours - kiln(env, loaded, picture, prompt="a red car")).max() > 2 / 255  # so does the prompt


def test_the_references_are_read_beside_the_image(env, loaded):
    """The VAE's reference latent reaches the transformer: the same vision tokens without it sample another image."""
    model, clip, vae = loaded
    image = {"images.image0": image_of(tiny_joyimage.picture(0, 120, 72))}
    (with_refs,) = call(text_encode_joyimage_edit, env, clip=clip, prompt=PROMPT, vae=vae, **image)
    (no_refs,) = call(text_encode_joyimage_edit, env, clip=clip, prompt=PROMPT, **image)
    assert len(with_refs[0][1][flux_references.LATENTS]) == 1 and flux_references.LATENTS not in no_refs[0][1]
    latent = {"samples": torch.zeros(1, 16, 8, 12)}
    outs = [call(ksampler, env, model=model, seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                 positive=c, negative=c, latent_image=latent)[0]["samples"] for c in (with_refs, no_refs)]
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_two_pictures_of_other_sizes_are_both_read(env, loaded):
    """ComfyUI's rule: references of other sizes than the image (each its own bucket) are frames 1 and 2, each
    grid with its own rows and columns; the second picture moves the image."""
    model, clip, vae = loaded
    first = image_of(tiny_joyimage.picture(0, 120, 72))
    latent = {"samples": torch.zeros(1, 16, 8, 12)}

    def sample(second):
        images = {"images.image0": first, "images.image1": image_of(second)}
        (cond,) = call(text_encode_joyimage_edit, env, clip=clip, prompt=PROMPT, vae=vae, **images)
        refs = cond[0][1][flux_references.LATENTS]
        assert [tuple(r.shape[-2:]) for r in refs] == [(8, 12), tuple(s // 8 for s in joyimage.bucket(
            second.size[1], second.size[0]))]
        return call(ksampler, env, model=model, seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
                    positive=cond, negative=cond, latent_image=latent)[0]["samples"]

    a, b = sample(tiny_joyimage.picture(1, 64, 64)), sample(tiny_joyimage.picture(2, 64, 64))
    assert (a - b).abs().max() > 1e-2


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_node_input(env, loaded, root):
    from engine.context import NodeError
    from nodes.checkpoint.joyimage_load import build_transformer
    from nodes.checkpoint.load import CheckpointError, load_checkpoint
    from nodes.families.base import ConditioningError

    _, clip, vae = loaded
    two = torch.zeros(2, 64, 64, 3)
    with pytest.raises(NodeError) as err:
        call(text_encode_joyimage_edit, env, clip=clip, prompt=PROMPT, vae=vae, **{"images.image0": two})
    assert err.value.input_name == "images.image0" and "one picture per input" in str(err.value)
    (other,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="krea2")
    with pytest.raises(NodeError) as err:
        call(text_encode_joyimage_edit, env, clip=other, prompt=PROMPT)
    assert err.value.input_name == "clip" and "type joyimage" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(text_encode_joyimage_edit, env, clip=clip, prompt=PROMPT, vae="not a vae")
    assert err.value.input_name == "vae"
    with pytest.raises(CheckpointError, match="JoyImage transformer.*UNETLoader.*type joyimage"):
        load_checkpoint(root / "diffusion_models" / UNET, torch.float32)
    state = tiny_joyimage.transformer_state()
    del state["proj_out.weight"]
    with pytest.raises(CheckpointError, match="proj_out.weight"):
        build_transformer(state, "broken.safetensors", torch.float32)
    net = joyimage.FAMILY.wrap_network(tiny_joyimage.components()["transformer"])
    with pytest.raises(ConditioningError) as cerr:
        net(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), torch.zeros(1, 7, 4096))
    assert cerr.value.input_name == "positive" and "type joyimage" in str(cerr.value)
