"""InstructPix2Pix: an 8-channel SD 1.x checkpoint and InstructPixToPixConditioning.

The claims: the tiny InstructPix2Pix checkpoint loads through CheckpointLoader; with
InstructPixToPixConditioning, KSampler equals diffusers' StableDiffusionInstructPix2PixPipeline at
image_guidance_scale 1 (where its three-way guidance is classifier-free guidance between the
negative and the positive prompt, both with the image) within 1/255; the image to edit
matters (another image, another result); a latent of another size gets the image fitted to
it, as in ComfyUI; an image latent of other channels is an error naming the conditioning.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from engine.context import NodeError
from node_call import Called, call
from nodes import inpaint, loaders, text, vae as vae_nodes
from nodes.checkpoint.tiny import IP2P
from nodes.sampling import ksampler
from test_sampling import PIXEL_TOL

STEPS, CFG, SEED = 6, 7.5, 11


@pytest.fixture(scope="module")
def ip2p_env(tmp_path_factory):
    from node_call import environment_over

    root = tmp_path_factory.mktemp("ip2p-models")
    tm.save_single_file(IP2P, root / "checkpoints" / "tiny-ip2p.safetensors")
    yield from environment_over(root, tmp_path_factory.mktemp("ip2p-data"))


def _pixels(seed: int) -> torch.Tensor:
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def _kiln(env, pixels, latent_override=None):
    model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name="tiny-ip2p.safetensors")
    pos = call(text.clip_text_encode, env, text="turn it into a watercolor", clip=clip)[0]
    neg = call(text.clip_text_encode, env, text="", clip=clip)[0]
    pos, neg, latent = call(inpaint.instruct_pix_to_pix_conditioning, env, positive=pos, negative=neg, vae=vae,
                            pixels=pixels)
    (out,) = call(ksampler, env, model=model, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent_override or latent, denoise=1.0)
    return call(vae_nodes.vae_decode, env, samples=out, vae=vae)[0], model


def test_it_equals_diffusers_instruct_pix2pix_pipeline(ip2p_env):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    ours, model = _kiln(ip2p_env, _pixels(0))
    assert model.peek().conv_in.in_channels == 8
    parts = dict(tm.components(IP2P))
    pipe = StableDiffusionInstructPix2PixPipeline(**{k: parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer")},
                                                  scheduler=EulerDiscreteScheduler.from_config(parts["scheduler"].config),
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="turn it into a watercolor", negative_prompt="", image=_pixels(0).permute(0, 3, 1, 2),
               num_inference_steps=STEPS, guidance_scale=CFG, image_guidance_scale=1.0,
               generator=torch.Generator().manual_seed(SEED), output_type="pt").images.permute(0, 2, 3, 1)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    other, _ = _kiln(ip2p_env, _pixels(1))
    assert (other - ours).abs().max().item() > 0.01  # the image to edit matters


def test_a_latent_of_another_size_gets_the_image_fitted_and_bad_channels_are_refused(ip2p_env):
    image, _ = _kiln(ip2p_env, _pixels(0), latent_override={"samples": torch.zeros(1, 4, 12, 12)})
    assert image.shape == (1, 96, 96, 3) and torch.isfinite(image).all()
    model, clip, vae = call(loaders.checkpoint_loader, ip2p_env, ckpt_name="tiny-ip2p.safetensors")
    pos = call(text.clip_text_encode, ip2p_env, text="x", clip=clip)[0]
    bad = [[pos[0][0], {**pos[0][1], "concat_latent_image": torch.zeros(1, 3, 8, 8)}]]
    with pytest.raises(NodeError) as err:
        call(ksampler, ip2p_env, model=model, seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
             positive=bad, negative=pos, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    assert err.value.input_name == "positive"
    rec = Called()
    call(ksampler, ip2p_env, rec, model=model, seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
         positive=pos, negative=pos, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    assert any("InstructPixToPixConditioning" in m for m in rec.messages)


def test_an_edm_checkpoint_is_refused_with_the_reason(tmp_path):
    """CosXL (edit) files mark their continuous EDM sampling with edm_vpred keys, which ComfyUI and
    Kiln read on SDXL files only (test_model_sampling_edm loads one): on this SD 1.x file the loader
    says so instead of producing noise."""
    from safetensors.torch import load_file, save_file

    from nodes.checkpoint.load import CheckpointError, load_checkpoint

    path = tm.save_single_file(IP2P, tmp_path / "cosxl-like.safetensors")
    state = load_file(str(path))
    state["edm_vpred.sigma_max"] = torch.tensor(120.0)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="EDM"):
        load_checkpoint(path, torch.float32)
