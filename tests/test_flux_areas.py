"""Area conditioning on a flow model (the tiny FLUX): the pixels no entry covers.

ComfyUI's rule (nodes.families.conditioning): where no entry of a side applies, that
side predicts a clean latent of zero. A flow model predicts the velocity
``v = noise - x0`` of its state ``x_t = (1 - t) x0 + t noise``, so its clean-latent
prediction is ``x_t - t v`` and a zero clean latent is ``v = x_t / t`` (not ``v = 0``,
which would leave the noise in place, nor the epsilon form). Consequences tested here:

* an area covering the whole image equals no area;
* with guidance, the guided clean latent in the uncovered pixels is
  ``x0_other + cfg * (0 - x0_other)``, the other side's result there scaled by ``1 - cfg``;
* sampled to the end without guidance, the uncovered pixels end at exactly zero (in the
  model's latent space; the stored latent adds the VAE's shift).
"""
from __future__ import annotations

import pytest
import torch

from node_call import Called, call, environment_over
from nodes import conditioning_nodes as cn
from nodes import split_loaders
from nodes.families.denoiser import Denoiser
from nodes.samplers.schedules import training_schedule
from nodes.sampling import ksampler
from test_flux_lora import _cond, flux_lora_root  # noqa: F401 (a fixture)

FLUX = "tiny-flux-dev.safetensors"


@pytest.fixture()
def env(flux_lora_root, tmp_path):
    yield from environment_over(flux_lora_root, tmp_path)


@pytest.fixture(scope="module")
def conds():
    embeds, pooled = _cond()
    other = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(9)) * embeds.std()
    return ([[embeds, {"pooled_output": pooled, "guidance": 3.5}]],
            [[other, {"pooled_output": pooled.flip(-1), "guidance": 3.5}]])


def _area(cond, width: int, height: int, x: int = 0, y: int = 0):
    return call(cn.conditioning_set_area, None, Called(), conditioning=cond, width=width, height=height, x=x, y=y,
                strength=1.0)[0]


def _sample(env, model, positive, negative, cfg: float) -> torch.Tensor:
    start = torch.zeros(1, 16, 8, 8)
    (out,) = call(ksampler, env, model=model, seed=3, steps=3, cfg=cfg, sampler_name="euler", scheduler="normal",
                  positive=positive, negative=negative, latent_image={"samples": start}, denoise=1.0)
    return out["samples"]


def test_an_area_over_the_whole_image_equals_no_area(env, conds):
    positive, negative = conds
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    whole = _area(positive, 64, 64)
    for cfg in (1.0, 2.5):
        plain = _sample(env, model, positive, negative, cfg)
        assert torch.allclose(_sample(env, model, whole, negative, cfg), plain, atol=1e-5), cfg
        assert (plain - _sample(env, model, negative, negative, cfg)).abs().max() > 1e-2  # the prompt matters


def test_uncovered_pixels_take_the_other_sides_result_scaled_by_one_minus_cfg(env, conds):
    positive, negative = conds
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    left = _area(positive, 32, 64)  # latent columns 0..3; 4..7 uncovered on the positive side
    schedule = training_schedule(model.scheduler_config)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(600.0)
    sigma = float(schedule.sigma(t))
    cfg = 3.0
    with model.unet() as net, torch.inference_mode():
        def denoiser(pos, neg, guidance):
            return Denoiser(net, model.family, positive=pos, negative=neg, cfg=guidance, image_size=(64, 64),
                            batch=1, schedule=schedule, prediction_type=model.prediction_type)

        guided = denoiser(left, negative, cfg).model_output(x, t)
        other = denoiser(negative, negative, 1.0).model_output(x, t)  # the negative prompt alone, whole image
        region = denoiser(left, negative, 1.0).model_output(x, t)  # positive side only
    x0_guided, x0_other, x0_region = (x - sigma * v for v in (guided, other, region))
    assert torch.allclose(x0_region[..., 4:], torch.zeros_like(x0_region[..., 4:]), atol=1e-5)
    assert torch.allclose(x0_guided[..., 4:], (1 - cfg) * x0_other[..., 4:], atol=1e-4)
    assert x0_other[..., 4:].abs().max() > 0.1  # not vacuous
    assert x0_region[..., :4].abs().max() > 0.1  # the covered part is the prompt's prediction


def test_uncovered_pixels_end_at_a_zero_latent(env, conds):
    positive, negative = conds
    (model,) = call(split_loaders.unet_loader, env, unet_name=FLUX)
    out = _sample(env, model, _area(positive, 32, 64), negative, 1.0)
    zero = model.latent.from_model(torch.zeros_like(out))  # the stored latent of a model-space zero (VAE shift)
    assert (out[..., 4:] - zero[..., 4:]).abs().max() <= 1e-5
    assert (out[..., :4] - zero[..., :4]).abs().max() > 0.1
