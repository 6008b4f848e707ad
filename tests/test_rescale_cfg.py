"""RescaleCFG (nodes/model_patches.py, rescale_guidance in nodes/families/denoiser.py).

On a v-prediction model ComfyUI's rescale (done on the velocity whatever the network
predicts) is diffusers' ``guidance_rescale``, so the tiny SD2-v txt2img run must equal
StableDiffusionPipeline's within 1/255. On an epsilon model the rescaled velocity must
have the conditional velocity's spread, image by image.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes.latent import empty_latent_image
from nodes.model_patches import rescale_cfg
from nodes.sampling import ksampler
from test_sampling import PIXEL_TOL, Recorder, sd1, sd2v  # noqa: F401 (fixtures)


def _txt2img(tiny, model, cfg=6.0):
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, model, 5, 8, cfg, "euler", "normal", tiny.pos, tiny.neg, empty)
    return tiny.decode(out["samples"])


def test_on_v_prediction_it_equals_diffusers_guidance_rescale(sd2v):
    pipe = sd2v.diffusers_pipe("txt2img", "euler")
    ref = pipe(height=64, width=64, num_inference_steps=8, guidance_scale=6.0, guidance_rescale=0.7,
               output_type="pt", generator=torch.Generator().manual_seed(5), **sd2v.embeds).images.permute(0, 2, 3, 1)
    (patched,) = rescale_cfg(Recorder().ctx, sd2v.model, 0.7)
    ours = _txt2img(sd2v, patched)
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    assert (ours - _txt2img(sd2v, sd2v.model)).abs().max().item() > 0.01  # the rescale changed the image
    assert sd2v.model.patches.cfg_rescale == 0.0  # the handle it was given samples as before


def test_on_epsilon_the_velocity_takes_the_conditional_spread_and_zero_is_plain_cfg(sd1):
    from nodes.families.denoiser import Denoiser
    from nodes.samplers.schedules import TrainingSchedule

    schedule = TrainingSchedule(sd1.model.scheduler_config)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(600.0)
    sigma = float(schedule.sigma(600.0))
    unet = sd1.parts["unet"]

    def output(cfg, rescale=0.0, negative=sd1.neg):
        denoiser = Denoiser(unet, sd1.model.family, positive=sd1.pos, negative=negative, cfg=cfg, image_size=(64, 64),
                            batch=2, schedule=schedule, cfg_rescale=rescale)
        with torch.no_grad():
            return denoiser.model_output(z, t)

    to_v = lambda eps: math.sqrt(1 + sigma ** 2) * eps - sigma * z  # noqa: E731
    cond, plain, full = output(1.0), output(7.0), output(7.0, 1.0)
    assert torch.allclose(output(7.0, 0.0), plain)
    spread = lambda x: x.std(dim=(1, 2, 3))  # noqa: E731
    assert torch.allclose(spread(to_v(full)), spread(to_v(cond)), rtol=1e-4)
    assert not torch.allclose(spread(to_v(plain)), spread(to_v(cond)), rtol=1e-2)  # CFG did inflate it
    half = output(7.0, 0.5)
    assert torch.allclose(half, (full + plain) / 2, atol=1e-5)  # the multiplier blends linearly


def test_it_refuses_a_flow_model_and_a_multiplier_out_of_range(sd1):
    from test_flux import _model

    with pytest.raises(NodeError) as err:
        rescale_cfg(Recorder().ctx, _model("dev"), 0.7)
    assert err.value.input_name == "model" and "flow" in str(err.value)
    with pytest.raises(NodeError) as err:
        rescale_cfg(Recorder().ctx, sd1.model, 1.5)
    assert err.value.input_name == "multiplier"
