"""Inpainting on tiny random-weight models: equal to diffusers' inpainting pipelines.

* Masked image-to-image with a 4-channel SD1 model (SetLatentNoiseMask + AddNoise +
  KSampler) equals StableDiffusionInpaintPipeline on the same weights, latent,
  mask, seed, steps and strength within 1/255 per pixel.
* A 9-channel inpainting model (SD1 and SDXL) fed by InpaintModelConditioning
  (noise_mask off: diffusers' 9-channel pipelines do not hold the unmasked region)
  equals StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline given the
  masked-image latent the test computes itself (grey = 0 under the binarised mask).

Both sides get latents, never pixels to encode, because diffusers samples the VAE
posterior from the noise generator (as in tests/test_sampling.py). The masks are
aligned to the 8-pixel latent grid so diffusers' nearest and ComfyUI's bilinear
downscaling agree. Not vacuous: outside the mask the latent is exactly the input's,
inside it changed.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import tiny_models
from engine.context import NodeError
from nodes import families
from nodes.handles import ModelHandle, VaeHandle
from nodes.inpaint import inpaint_model_conditioning, set_latent_noise_mask, vae_encode_for_inpaint
from nodes.latent import add_noise
from nodes.sampling import ksampler
from test_sampling import KILN_TO_DIFFUSERS, PIXEL_TOL, Recorder

PROMPT, NEGATIVE = "a red barn in a field", "blurry"


class Tiny:
    """A tiny model (plain or inpainting) as a Kiln MODEL and VAE, with its prompts encoded."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.parts = tiny_models.components(variant)
        self.sdxl = variant.startswith("sdxl")
        fam = families.by_name("sdxl" if self.sdxl else "sd1")
        unet, vae = self.parts["unet"], self.parts["vae"]
        self.scale = float(vae.config.scaling_factor)
        self.model = ModelHandle(fam, scheduler_config=dict(self.parts["scheduler"].config),
                                 latent=dataclasses.replace(fam.latent, scale=self.scale),
                                 _use_unet=lambda: contextlib.nullcontext(unet))
        self.vae = VaeHandle(latent_scale=self.scale, _use_vae=lambda: contextlib.nullcontext(vae))
        self.pos, self.neg, self.embeds = tiny_models.encoded_prompts(variant, PROMPT, NEGATIVE)
        # A smooth image with some structure (IMAGE [1, 64, 64, 3] in 0..1).
        yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
        self.image = torch.stack([yy, xx, (yy * 3 + xx * 5).sin() * 0.5 + 0.5], -1).unsqueeze(0)
        self.init = self.vae.encode(self.image)  # unscaled latent [1, 4, 8, 8]

    def pipe(self, sampler: str):
        import diffusers

        cls = diffusers.StableDiffusionXLInpaintPipeline if self.sdxl else diffusers.StableDiffusionInpaintPipeline
        pipe = tiny_models.pipeline(self.variant, cls=cls, parts=dict(self.parts))
        name, extra = KILN_TO_DIFFUSERS[sampler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
        return pipe

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return tiny_models.decode(self.parts["vae"], samples)


def block_mask() -> torch.Tensor:
    """MASK [1, 64, 64]: a rectangle on the 8-pixel grid (latent rows 2..5, columns 1..4)."""
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    return mask


@pytest.fixture(scope="module")
def sd1():
    return Tiny("sd1")


def _reference(tiny: Tiny, sampler: str, mask: torch.Tensor, masked_latent: torch.Tensor, **kw) -> torch.Tensor:
    pipe = tiny.pipe(sampler)
    extra = {"aesthetic_score": 6.0} if tiny.sdxl else {}
    out = pipe(image=tiny.init * tiny.scale, mask_image=mask.unsqueeze(1), masked_image_latents=masked_latent,
               height=64, width=64, num_inference_steps=10, guidance_scale=7.5, output_type="pt",
               generator=torch.Generator().manual_seed(42), **tiny.embeds, **kw, **extra).images
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_ancestral"])
def test_masked_img2img_equals_diffusers_inpaint_pipeline(sd1, sampler):
    mask = block_mask()
    ref = _reference(sd1, sampler, mask, torch.zeros(1, 4, 8, 8), strength=0.6)
    rec = Recorder()
    lat, = set_latent_noise_mask(rec.ctx, {"samples": sd1.init}, mask)
    lat, = add_noise(rec.ctx, sd1.model, lat, 0.6, 42)
    out, = ksampler(rec.ctx, sd1.model, 42, 10, 7.5, sampler, "normal", sd1.pos, sd1.neg, lat)
    ours = sd1.decode(out["samples"])
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # Not vacuous: outside the mask the latent is the input's exactly, inside it changed.
    keep = torch.nn.functional.interpolate(mask.unsqueeze(1), size=(8, 8)) < 0.5
    keep = keep.expand_as(out["samples"])
    assert torch.equal(out["samples"][keep], sd1.init[keep])
    assert (out["samples"][~keep] - sd1.init[~keep]).abs().max().item() > 0.05
    # ...and without the noise mask the same run changes the outside too.
    plain, = ksampler(rec.ctx, sd1.model, 42, 10, 7.5, sampler, "normal", sd1.pos, sd1.neg,
                      add_noise(rec.ctx, sd1.model, {"samples": sd1.init}, 0.6, 42)[0])
    assert (plain["samples"][keep] - sd1.init[keep]).abs().max().item() > 0.05


@pytest.mark.parametrize("variant,sampler", [("sd1-inpaint", "euler"), ("sd1-inpaint", "dpmpp_2m"),
                                             ("sdxl-inpaint", "euler")])
def test_inpainting_model_equals_diffusers(variant, sampler):
    tiny = Tiny(variant)
    mask = block_mask()
    rec = Recorder()
    pos, neg, lat = inpaint_model_conditioning(rec.ctx, tiny.pos, tiny.neg, tiny.vae, tiny.image, mask, False)
    assert "noise_mask" not in lat
    # The masked image as diffusers makes it (pixels under the binarised mask set to 0 in -1..1).
    pixels = (tiny.image.permute(0, 3, 1, 2) * 2 - 1) * (mask.unsqueeze(1) < 0.5)
    with torch.no_grad():
        masked_latent = tiny.parts["vae"].encode(pixels).latent_dist.mean * tiny.scale
    assert torch.allclose(pos[0][1]["concat_latent_image"] * tiny.scale, masked_latent, atol=1e-5)
    ref = _reference(tiny, sampler, mask, masked_latent, strength=0.7)
    lat, = add_noise(rec.ctx, tiny.model, lat, 0.7, 42)
    out, = ksampler(rec.ctx, tiny.model, 42, 10, 7.5, sampler, "normal", pos, neg, lat)
    ours = tiny.decode(out["samples"])
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # Not vacuous: the extra channels matter (another mask gives another image).
    other = torch.zeros(1, 64, 64)
    other[:, 0:32, 32:64] = 1.0
    pos2, neg2, lat2 = inpaint_model_conditioning(rec.ctx, tiny.pos, tiny.neg, tiny.vae, tiny.image, other, False)
    out2, = ksampler(rec.ctx, tiny.model, 42, 10, 7.5, sampler, "normal", pos2, neg2,
                     add_noise(rec.ctx, tiny.model, lat2, 0.7, 42)[0])
    assert (tiny.decode(out2["samples"]) - ours).abs().max().item() > 0.01


def test_inpainting_model_with_noise_mask_keeps_the_outside():
    tiny = Tiny("sd1-inpaint")
    mask = block_mask()
    rec = Recorder()
    pos, neg, lat = inpaint_model_conditioning(rec.ctx, tiny.pos, tiny.neg, tiny.vae, tiny.image, mask, True)
    out, = ksampler(rec.ctx, tiny.model, 1, 6, 7.0, "euler", "normal", pos, neg, lat)
    keep = (torch.nn.functional.interpolate(mask.unsqueeze(1), size=(8, 8)) < 0.5).expand_as(out["samples"])
    assert torch.equal(out["samples"][keep], tiny.init[keep])
    assert (out["samples"][~keep] - tiny.init[~keep]).abs().max().item() > 0.05


def test_inpainting_model_without_inpaint_inputs_repaints_everything():
    """ComfyUI's defaults (mask of ones, grey masked image), said in a node message."""
    tiny = Tiny("sd1-inpaint")
    rec = Recorder()
    out, = ksampler(rec.ctx, tiny.model, 1, 4, 7.0, "euler", "normal", tiny.pos, tiny.neg,
                    {"samples": torch.zeros(1, 4, 8, 8)})
    assert out["samples"].abs().max() > 0.1
    assert any("inpainting model (9 input channels)" in m and "ComfyUI" in m for m in rec.messages)
    # VAEEncodeForInpaint alone is enough: the noise mask and the input latent feed the channels.
    rec2 = Recorder()
    lat, = vae_encode_for_inpaint(rec2.ctx, tiny.image, tiny.vae, block_mask(), 0)
    out2, = ksampler(rec2.ctx, tiny.model, 1, 4, 7.0, "euler", "normal", tiny.pos, tiny.neg, lat)
    assert not any("nothing says" in m for m in rec2.messages)
    keep = (torch.nn.functional.interpolate(block_mask().unsqueeze(1), size=(8, 8)) < 0.5).expand_as(lat["samples"])
    assert torch.equal(out2["samples"][keep], lat["samples"][keep])


# -- bad input: each names the node's input and the reason ---------------------------------

def test_mask_of_another_size_is_resized_by_the_rule_or_refused(sd1):
    rec = Recorder()
    big = torch.zeros(1, 128, 128)
    big[:, 32:96, 16:80] = 1.0
    lat, = set_latent_noise_mask(rec.ctx, {"samples": sd1.init}, big)
    assert lat["noise_mask"].shape == (1, 1, 64, 64)
    assert torch.equal(lat["noise_mask"][0, 0], block_mask()[0])  # same region, half the size
    assert any("128x128" in m and "64x64" in m for m in rec.messages)
    with pytest.raises(NodeError) as err:
        set_latent_noise_mask(rec.ctx, {"samples": sd1.init}, torch.ones(1, 64, 32) * torch.arange(32) / 32)
    assert err.value.input_name == "mask" and "32x64" in str(err.value) and "64x64" in str(err.value)
    with pytest.raises(NodeError) as err:
        inpaint_model_conditioning(rec.ctx, sd1.pos, sd1.neg, sd1.vae, sd1.image, big[:, :, :64], True)
    assert err.value.input_name == "mask" and "64x128" in str(err.value)
    # A noise mask put on a latent by hand is held to the same rule at KSampler.
    with pytest.raises(NodeError) as err:
        ksampler(rec.ctx, sd1.model, 1, 2, 7.0, "euler", "normal", sd1.pos, sd1.neg,
                 {"samples": sd1.init, "noise_mask": big[:, :, :64]})
    assert err.value.input_name == "latent_image" and "64x128" in str(err.value)


def test_empty_mask_says_nothing_to_repaint(sd1):
    rec = Recorder()
    lat, = set_latent_noise_mask(rec.ctx, {"samples": sd1.init}, torch.zeros(1, 64, 64))
    assert any("nothing to repaint" in m for m in rec.messages)
    rec = Recorder()
    out, = ksampler(rec.ctx, sd1.model, 1, 4, 7.0, "euler", "normal", sd1.pos, sd1.neg,
                    add_noise(rec.ctx, sd1.model, lat, 0.8, 1)[0])
    assert torch.equal(out["samples"], sd1.init) and "noise" not in out
    assert any("nothing to repaint" in m for m in rec.messages)
    assert not rec.steps  # no model evaluation was spent on it
    for node in (lambda c: vae_encode_for_inpaint(c, sd1.image, sd1.vae, torch.zeros(64, 64), 6),
                 lambda c: inpaint_model_conditioning(c, sd1.pos, sd1.neg, sd1.vae, sd1.image, torch.zeros(64, 64))):
        rec = Recorder()
        node(rec.ctx)
        assert any("nothing to repaint" in m for m in rec.messages)


def test_inpaint_latent_and_model_mismatches_are_refused(sd1):
    tiny = Tiny("sd1-inpaint")
    rec = Recorder()
    # Conditioning made from a 128x128 image, sampled on a 64x64 latent.
    big_image = torch.nn.functional.interpolate(tiny.image.permute(0, 3, 1, 2), size=(128, 128)).permute(0, 2, 3, 1)
    big_mask = torch.zeros(1, 128, 128)
    big_mask[:, 32:96, 16:80] = 1
    pos, neg, _ = inpaint_model_conditioning(rec.ctx, tiny.pos, tiny.neg, tiny.vae, big_image, big_mask, False)
    with pytest.raises(NodeError) as err:
        ksampler(rec.ctx, tiny.model, 1, 2, 7.0, "euler", "normal", pos, neg, {"samples": tiny.init})
    assert err.value.input_name == "positive" and "(4, 16, 16)" in str(err.value) and "(4, 8, 8)" in str(err.value)
    # A latent of another latent space (an encoded one: an empty one is widened to the model's, as ComfyUI does).
    with pytest.raises(NodeError) as err:
        ksampler(rec.ctx, tiny.model, 1, 2, 7.0, "euler", "normal", tiny.pos, tiny.neg,
                 {"samples": torch.ones(1, 16, 8, 8)})
    assert err.value.input_name == "latent_image" and "16 channels" in str(err.value)
    # A network whose input width is neither plain (4) nor inpainting (9).
    from diffusers import UNet2DConditionModel

    odd = UNet2DConditionModel.from_config(dict(sd1.parts["unet"].config), in_channels=6).eval()
    model = dataclasses.replace(sd1.model, _use_unet=lambda: contextlib.nullcontext(odd))
    with pytest.raises(NodeError) as err:
        ksampler(rec.ctx, model, 1, 2, 7.0, "euler", "normal", sd1.pos, sd1.neg, {"samples": sd1.init})
    assert err.value.input_name == "model" and "6 input channels" in str(err.value)


def test_vae_encode_for_inpaint_greys_and_grows():
    """Pixels under the rounded mask become 0.5 grey; the noise mask grows by a square."""
    from nodes.inpaint import grey_out, grow

    pixels = torch.rand(1, 16, 16, 3)
    mask = torch.zeros(1, 16, 16)
    mask[:, 6:9, 5:7] = 0.7  # rounds to 1
    mask[:, 0, 0] = 0.3  # rounds to 0
    grey = grey_out(pixels, mask)
    assert torch.equal(grey[:, 6:9, 5:7], torch.full((1, 3, 2, 3), 0.5))
    assert torch.allclose(grey[:, 0, 0], pixels[:, 0, 0]) and torch.allclose(grey[:, 10:], pixels[:, 10:])
    grown = grow(mask, 3)  # a 3x3 square: one pixel on every side
    expected = torch.zeros(1, 16, 16)
    expected[:, 5:10, 4:8] = 1
    assert torch.equal(grown, expected)
    grown6 = grow(mask, 6)  # even size, padding 3: out[i] sums in[i-3..i+2], so 2 before and 3 after
    expected = torch.zeros(1, 16, 16)
    expected[:, 4:12, 3:10] = 1
    assert torch.equal(grown6, expected)
    assert torch.equal(grow(mask, 0), mask.round())


@pytest.mark.parametrize("sampler,scheduler", [("heun", "normal"), ("dpm_2", "karras"), ("lms", "normal"),
                                               ("dpmpp_2s_ancestral", "normal"), ("ddpm", "simple"),
                                               ("uni_pc", "karras"), ("euler", "sgm_uniform"), ("lcm", "normal"),
                                               ("dpmpp_sde", "normal")])
def test_noise_mask_holds_with_every_kind_of_sampler(sd1, sampler, scheduler):
    """diffusers' schedulers on their grids or on a given sigma list, and Kiln's own steppers:
    the outside is the input's bit for bit, the inside changes (ComfyUI's denoise path here)."""
    from nodes.samplers.schedules import TrainingSchedule

    rec = Recorder()
    lat, = set_latent_noise_mask(rec.ctx, {"samples": sd1.init}, block_mask())
    seen = []
    hook = sd1.parts["unet"].register_forward_pre_hook(lambda m, args: seen.append((args[0][:1].clone(), args[1])))
    try:
        out, = ksampler(rec.ctx, sd1.model, 5, 3, 7.0, sampler, scheduler, sd1.pos, sd1.neg, lat, 0.7)
    finally:
        hook.remove()
    keep = (torch.nn.functional.interpolate(block_mask().unsqueeze(1), size=(8, 8)) < 0.5).expand_as(sd1.init)
    assert torch.equal(out["samples"][keep], sd1.init[keep])
    # Every network input is, outside the mask, the input latent noised to that call's level
    # with the run's noise (KSampler's first draw for seed 5), as the network sees it.
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    x0 = sd1.model.latent.to_model(sd1.init)
    schedule = TrainingSchedule(sd1.model.scheduler_config)
    assert seen
    for model_in, t in seen:
        sigma = float(schedule.sigma(float(t)))
        expected = (x0 + noise * sigma) / (sigma ** 2 + 1) ** 0.5
        assert torch.allclose(model_in[keep], expected[keep], atol=2e-3), (float(t), sigma)
    assert (out["samples"][~keep] - sd1.init[~keep]).abs().max().item() > 0.05
    assert torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("variant", ["sd1-inpaint", "sdxl-inpaint"])
def test_inpainting_single_files_load_as_nine_channel_models(tmp_path, variant):
    """The checkpoint loader reads a 9-channel single file (original layout) into the same UNet."""
    from engine.context import Environment, Paths
    from node_call import Called, call
    from nodes import loaders
    from nodes.inpaint_sampling import in_channels
    from nodes.runtime.models import ModelManager

    src = tiny_models.components(variant)
    models = tmp_path / "models"
    tiny_models.save_single_file(variant, models / "checkpoints" / f"tiny-{variant}.safetensors", parts=src)
    env = Environment(paths=Paths.under(tmp_path / "data", models=models), models=ModelManager(device="cpu"))
    try:
        model, _, _ = call(loaders.checkpoint_loader, env, Called(), ckpt_name=f"tiny-{variant}.safetensors")
        assert model.family.name == variant.removesuffix("-inpaint") and in_channels(model) == 9
        with model.unet() as unet:
            mine, theirs = unet.state_dict(), src["unet"].state_dict()
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k].float(), theirs[k].float()) for k in mine)
    finally:
        env.models.unload_all(collect=False)


def test_custom_sampling_nodes_honour_the_noise_mask(sd1):
    """SamplerCustomAdvanced and KSamplerAdvanced hold the unmasked region as KSampler does
    (the preparation is shared), so the same settings give KSampler's masked result."""
    from nodes import custom_sampling as cs

    rec = Recorder()
    lat, = set_latent_noise_mask(rec.ctx, {"samples": sd1.init}, block_mask())
    ref, = ksampler(rec.ctx, sd1.model, 5, 8, 7.0, "euler", "normal", sd1.pos, sd1.neg, lat, 0.7)

    def custom(latent: dict) -> dict:
        guider, = cs.cfg_guider(rec.ctx, sd1.model, sd1.pos, sd1.neg, 7.0)
        sigmas, = cs.basic_scheduler(rec.ctx, sd1.model, "normal", 8, 0.7)
        out, _ = cs.sampler_custom_advanced(rec.ctx, cs.random_noise(rec.ctx, 5)[0], guider,
                                            cs.ksampler_select(rec.ctx, "euler")[0], sigmas, latent)
        return out

    out = custom(lat)
    assert (sd1.decode(out["samples"]) - sd1.decode(ref["samples"])).abs().max().item() <= PIXEL_TOL
    keep = (torch.nn.functional.interpolate(block_mask().unsqueeze(1), size=(8, 8)) < 0.5).expand_as(sd1.init)
    assert torch.equal(out["samples"][keep], sd1.init[keep])
    assert (out["samples"][~keep] - sd1.init[~keep]).abs().max().item() > 0.05
    unmasked = custom({"samples": sd1.init})  # not vacuous: without the mask the outside changes
    assert (unmasked["samples"][keep] - sd1.init[keep]).abs().max().item() > 0.05

    adv, = cs.ksampler_advanced(rec.ctx, sd1.model, "enable", 5, 8, 7.0, "euler", "normal", sd1.pos, sd1.neg,
                                lat, 2, 10000, "disable")
    assert torch.equal(adv["samples"][keep], sd1.init[keep])
    assert (adv["samples"][~keep] - sd1.init[~keep]).abs().max().item() > 0.05
    # An empty mask leaves the latent as it is, with the node saying why.
    empty, = set_latent_noise_mask(rec.ctx, {"samples": sd1.init}, torch.zeros(1, 64, 64))
    assert torch.equal(custom(empty)["samples"], sd1.init)
    assert any("nothing to repaint" in m for m in rec.messages)
