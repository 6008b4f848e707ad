"""FLUX.1 on a tiny random model: Kiln's nodes against diffusers' Flux pipelines.

Both sides get the same weights, conditioning, init latent, seed, steps,
strength and guidance; the decoded images must agree within 1/255 per pixel.
diffusers samples the VAE posterior with the noise generator (Kiln's VAEEncode
takes the mean), so both get the same init latent, handed to the pipeline as a
16-channel "image" (it uses such an input as the latent). Each parity test also
checks that changing strength/guidance changes the result, so agreement is not
vacuous.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import tiny_flux
import tiny_models
from engine.context import NodeError
from node_call import Recorder
from nodes.families import flux
from nodes.handles import ModelHandle
from nodes.latent import add_noise
from nodes.samplers import flow
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a red barn in a field"


def _model(variant: str) -> ModelHandle:
    parts = tiny_flux.components(variant)
    family = flux.FAMILY if variant == "dev" else flux.SCHNELL
    return ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(parts["transformer"]))


def _embeds(variant: str):
    pipe = tiny_flux.pipeline(variant)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, device="cpu", max_sequence_length=512)
    return embeds, pooled


def _decode(variant: str, raw: torch.Tensor) -> torch.Tensor:
    return tiny_models.decode(tiny_flux.components(variant)["vae"], raw)


def _init_raw() -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 + 0.1159


def kiln_img2img(variant: str, strength: float, guidance: float, steps: int = 6, seed: int = 42) -> torch.Tensor:
    embeds, pooled = _embeds(variant)
    cond = [[embeds, {"pooled_output": pooled, "guidance": guidance}]]
    model = _model(variant)
    (latent,) = add_noise(Recorder().ctx, model, {"samples": _init_raw()}, strength=strength, seed=seed)
    (out,) = ksampler(Recorder().ctx, model, seed, steps, 1.0, "euler", "normal", cond, cond, latent)
    return _decode(variant, out["samples"])


def diffusers_img2img(variant: str, strength: float, guidance: float, steps: int = 6, seed: int = 42) -> torch.Tensor:
    from diffusers import FluxImg2ImgPipeline

    embeds, pooled = _embeds(variant)
    pipe = tiny_flux.pipeline(variant, cls=FluxImg2ImgPipeline)
    init = flux.FLUX_LATENT.to_model(_init_raw())
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=init, strength=strength, height=64,
                   width=64, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("variant,strength,guidance", [("dev", 0.6, 3.5), ("schnell", 0.8, 0.0)])
def test_img2img_equals_flux_img2img_pipeline(variant, strength, guidance):
    ours = kiln_img2img(variant, strength, guidance)
    theirs = diffusers_img2img(variant, strength, guidance)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    other = kiln_img2img(variant, strength - 0.3, guidance)
    assert (ours - other).abs().max() > 0.02  # strength matters: the comparison is not vacuous


def test_dev_guidance_is_a_network_input():
    a, b = kiln_img2img("dev", 0.8, 1.5), kiln_img2img("dev", 0.8, 6.0)
    assert (a - b).abs().max() > 0.005
    assert (kiln_img2img("dev", 0.8, 6.0) - diffusers_img2img("dev", 0.8, 6.0)).abs().max() <= PIXEL_TOL


def test_strength_rounding_is_flux_img2img_s():
    from nodes.samplers.flow import strength_start

    assert strength_start(10, 0.75) == 2  # runs 8 steps (SD's rule would run int(7.5) = 7)
    assert strength_start(10, 0.0) == 10 and strength_start(10, 1.0) == 0


def test_txt2img_equals_flux_pipeline():
    from nodes.families.flux import FLUX_LATENT

    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    (out,) = ksampler(Recorder().ctx, _model("dev"), 5, 4, 1.0, "euler", "normal", cond, cond, empty)
    ours = _decode("dev", out["samples"])
    with torch.no_grad():
        theirs = tiny_flux.pipeline("dev")(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
                                            num_inference_steps=4, guidance_scale=3.5,
                                            generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert (ours - theirs.permute(0, 2, 3, 1)).abs().max() <= PIXEL_TOL
    assert FLUX_LATENT.channels == 16


def test_flow_refuses_samplers_it_lacks():
    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled}]]
    with pytest.raises(NodeError) as err:
        ksampler(Recorder().ctx, _model("dev"), 0, 4, 1.0, "ddpm", "normal", cond, cond,
                 {"samples": torch.zeros(1, 16, 8, 8)})
    assert err.value.input_name == "sampler_name" and "flow" in str(err.value)
    assert all(name in str(err.value) for name in flow.SAMPLERS)  # the message lists what runs


# -- ComfyUI's custom-sampling nodes on FLUX ---------------------------------------------------

def _fixed(model: ModelHandle) -> ModelHandle:
    """The model with ModelSamplingFlux at the tests' 64 px (the shift KSampler uses for that size)."""
    from nodes.flux_nodes import model_sampling_flux

    return model_sampling_flux(Recorder().ctx, model, 1.15, 0.5, 64, 64)[0]


def custom_advanced(model, positive, negative, cfg, latent, *, seed, steps, denoise, sampler="euler",
                    scheduler="normal", ctx=None):
    from nodes.custom_sampling import (basic_guider, basic_scheduler, cfg_guider, ksampler_select, random_noise,
                                       sampler_custom_advanced)

    ctx = ctx or Recorder().ctx
    (sigmas,) = basic_scheduler(ctx, model, scheduler, steps, denoise)
    guider = basic_guider(ctx, model, positive)[0] if negative is None else \
        cfg_guider(ctx, model, positive, negative, cfg)[0]
    out, _ = sampler_custom_advanced(ctx, random_noise(ctx, seed)[0], guider, ksampler_select(ctx, sampler)[0],
                                     sigmas, latent)
    return sigmas, out


def test_basic_scheduler_gives_ksamplers_flow_sigmas():
    from nodes.custom_sampling import basic_scheduler

    model = _fixed(_model("dev"))
    ctx = Recorder().ctx
    (full,) = basic_scheduler(ctx, model, "normal", 4, 1.0)
    assert torch.equal(full, flow.scheduler(model.scheduler_config, "normal", 4, 8, 8).sigmas)
    (tail,) = basic_scheduler(ctx, model, "simple", 4, 0.5)  # KSampler's denoise rule: last 4 of 8
    assert torch.equal(tail, flow.scheduler(model.scheduler_config, "simple", 8, 8, 8).sigmas[4:])
    # without ModelSamplingFlux the scheduler cannot see the size: ComfyUI's 1024 px shift
    (unfixed,) = basic_scheduler(ctx, _model("dev"), "normal", 4, 1.0)
    assert torch.equal(unfixed, flow.scheduler(model.scheduler_config | {flow.SHIFT_SEQ_LEN: 4096}, "normal", 4,
                                               8, 8).sigmas)
    assert (unfixed - full).abs().max() > 0.01


def test_custom_advanced_txt2img_equals_ksampler():
    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    model = _fixed(_model("dev"))
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    (ref,) = ksampler(Recorder().ctx, model, 5, 4, 1.0, "euler", "normal", cond, cond, empty)
    _, out = custom_advanced(model, cond, None, 1.0, empty, seed=5, steps=4, denoise=1.0)
    ours = _decode("dev", out["samples"])
    assert (ours - _decode("dev", ref["samples"])).abs().max() <= PIXEL_TOL
    _, other = custom_advanced(model, cond, None, 1.0, empty, seed=6, steps=4, denoise=1.0)
    assert (ours - _decode("dev", other["samples"])).abs().max() > 0.02  # the seed matters: not vacuous


def test_custom_advanced_img2img_with_cfg_guider_equals_ksampler_denoise():
    embeds, pooled = _embeds("dev")
    positive = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[embeds * 0.5, {"pooled_output": pooled, "guidance": 1.0}]]
    model = _fixed(_model("dev"))
    latent = {"samples": _init_raw()}
    (ref,) = ksampler(Recorder().ctx, model, 9, 4, 2.0, "euler", "simple", positive, negative, latent, denoise=0.6)
    _, out = custom_advanced(model, positive, negative, 2.0, latent, seed=9, steps=4, denoise=0.6,
                             scheduler="simple")
    ours = _decode("dev", out["samples"])
    assert (ours - _decode("dev", ref["samples"])).abs().max() <= PIXEL_TOL
    _, other = custom_advanced(model, positive, negative, 2.0, latent, seed=10, steps=4, denoise=0.6,
                               scheduler="simple")
    assert (ours - _decode("dev", other["samples"])).abs().max() > 0.02


def test_custom_sampling_on_flow_refuses_by_node_input_and_notes_the_shift_size():
    from nodes.custom_sampling import basic_scheduler, ksampler_advanced

    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled}]]
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    with pytest.raises(NodeError) as err:
        custom_advanced(_model("dev"), cond, None, 1.0, empty, seed=0, steps=2, denoise=1.0, sampler="ddpm")
    assert err.value.input_name == "sampler" and "ddpm" in str(err.value) and "flow" in str(err.value)
    with pytest.raises(NodeError) as err:
        ksampler_advanced(Recorder().ctx, _model("dev"), "enable", 0, 2, 1.0, "ddpm", "normal", cond, cond,
                          empty, 0, 10000, "disable")
    assert err.value.input_name == "sampler_name" and "ddpm" in str(err.value)
    with pytest.raises(NodeError) as err:
        basic_scheduler(Recorder().ctx, _model("dev"), "ddim_uniform", 4, 1.0)
    assert err.value.input_name == "scheduler" and "ddim_uniform" in str(err.value)
    rec = Recorder()
    custom_advanced(_model("dev"), cond, None, 1.0, empty, seed=0, steps=1, denoise=1.0, ctx=rec.ctx)
    assert any("ModelSamplingFlux" in m and "64x64" in m for m in rec.messages)
    rec = Recorder()
    custom_advanced(_fixed(_model("dev")), cond, None, 1.0, empty, seed=0, steps=1, denoise=1.0, ctx=rec.ctx)
    assert not any("ModelSamplingFlux" in m for m in rec.messages)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_split_sigmas_with_disable_noise_continues_a_flow_run(name):
    """High half with RandomNoise, low half with DisableNoise: one run (the flow state is handed
    on as it is, not blended again with 1 - sigma). Heun keeps no history, so it splits too (the
    high half, ending above 0, takes its last step's second evaluation there)."""
    from nodes.custom_sampling import (basic_guider, basic_scheduler, disable_noise, ksampler_select, random_noise,
                                       sampler_custom_advanced, split_sigmas)

    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    model, ctx = _fixed(_model("dev")), Recorder().ctx
    guider, sampler = basic_guider(ctx, model, cond)[0], ksampler_select(ctx, name)[0]
    (sigmas,) = basic_scheduler(ctx, model, "normal", 4, 1.0)
    high, low = split_sigmas(ctx, sigmas, 2)
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    whole, _ = sampler_custom_advanced(ctx, random_noise(ctx, 5)[0], guider, sampler, sigmas, empty)
    half, _ = sampler_custom_advanced(ctx, random_noise(ctx, 5)[0], guider, sampler, high, empty)
    done, _ = sampler_custom_advanced(ctx, disable_noise(ctx)[0], guider, sampler, low, half)
    ours = _decode("dev", done["samples"])
    assert (ours - _decode("dev", whole["samples"])).abs().max() <= PIXEL_TOL
    assert (_decode("dev", half["samples"]) - ours).abs().max() > 0.02  # the halves really split the run


def _block_mask() -> torch.Tensor:
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 0:32] = 1.0  # on the 16-pixel patch grid, so nearest and bilinear downscaling agree
    return mask


def _masked_run(sampler: str, seen: list | None = None) -> tuple[dict, dict]:
    """(the masked, AddNoise 0.7 latent, KSampler's output) on FLUX [dev]; ``seen`` collects the
    transformer's (hidden_states, timestep) per call."""
    from nodes.inpaint import set_latent_noise_mask

    embeds, pooled = _embeds("dev")
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    model, rec = _model("dev"), Recorder()
    (lat,) = set_latent_noise_mask(rec.ctx, {"samples": _init_raw()}, _block_mask())
    (lat,) = add_noise(rec.ctx, model, lat, strength=0.7, seed=42)
    net = tiny_flux.components("dev")["transformer"]
    hook = net.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"], kw["timestep"])) if seen is not None else None,
        with_kwargs=True)
    try:
        (out,) = ksampler(rec.ctx, model, 42, 5, 1.0, sampler, "normal", cond, cond, lat)
    finally:
        hook.remove()
    return lat, out


def _kept() -> torch.Tensor:
    return (torch.nn.functional.interpolate(_block_mask().unsqueeze(1), size=(8, 8)) < 0.5).expand(1, 16, 8, 8)


def test_noise_mask_equals_flux_inpaint_pipeline():
    """SetLatentNoiseMask on FLUX: the kept region is held to the input noised as a flow model
    noises (a blend, not x0 + sigma * noise), as FluxInpaintPipeline does after every step."""
    from diffusers import FluxInpaintPipeline

    embeds, pooled = _embeds("dev")
    _, out = _masked_run("euler")
    init = flux.FLUX_LATENT.to_model(_init_raw())
    pipe = tiny_flux.pipeline("dev", cls=FluxInpaintPipeline)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=init,
                      mask_image=_block_mask().unsqueeze(1), masked_image_latents=init, strength=0.7, height=64,
                      width=64, num_inference_steps=5, guidance_scale=3.5, generator=torch.Generator().manual_seed(42),
                      output_type="pt").images
    ours = _decode("dev", out["samples"])
    assert (ours - theirs.permute(0, 2, 3, 1)).abs().max() <= PIXEL_TOL
    assert torch.equal(out["samples"][_kept()], _init_raw()[_kept()])


@pytest.mark.parametrize("sampler,calls", [("euler", 4), ("heun", 7), ("dpmpp_2m", 4), ("euler_ancestral", 4),
                                           ("ipndm", 4), ("res_multistep", 4), ("dpm_fast", 4), ("uni_pc_bh2", 4)])
def test_noise_mask_holds_the_flow_blend_with_every_flow_sampler(sampler, calls):
    """Every transformer input is, outside the mask, the input blended with the run's noise at that
    call's flow time (heun's second evaluations included); held as x0 + sigma * noise, the DDPM
    rule, it would not be. The result outside the mask is the input exactly, inside it changed."""
    from diffusers import FluxPipeline

    seen: list = []
    lat, out = _masked_run(sampler, seen)
    init = flux.FLUX_LATENT.to_model(_init_raw())
    pack = lambda x: FluxPipeline._pack_latents(x, 1, 16, 8, 8)  # noqa: E731
    kept = pack(_kept().to(torch.float32)) > 0.5
    assert len(seen) == calls  # 5 steps at strength 0.7 run the last 4 (FluxImg2ImgPipeline's rounding)
    for hidden, t in seen:
        sigma = float(t.reshape(-1)[0])
        blend = pack(sigma * lat["noise"] + (1 - sigma) * init)
        assert torch.allclose(hidden[kept], blend[kept], atol=1e-5), sigma
        assert not torch.allclose(hidden[kept], pack(init + sigma * lat["noise"])[kept], atol=1e-2)
    assert torch.equal(out["samples"][_kept()], _init_raw()[_kept()])
    assert (out["samples"][~_kept()] - _init_raw()[~_kept()]).abs().max() > 0.05
