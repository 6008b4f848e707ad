"""VariationNoise: A1111's variation seeds as a NOISE for the custom-sampling nodes.

The claims: strength 0 is noise_seed's noise and 1 variation_seed's, bit for bit (or
to float rounding); in between the noise turns along the great circle (its angle to the
base noise is the fraction of the whole angle, and its size stays Gaussian-sized, where a
straight blend would shrink it); each image of a batch is its single run; and through
SamplerCustomAdvanced a small strength gives a close variation that drifts further as the
strength grows.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes import custom_sampling as cs
from nodes.samplers.custom import Noise, slerp
from test_sampling import Recorder, sd1  # noqa: F401 (sd1 is a fixture)

CTX = Recorder().ctx
SHAPE = torch.zeros(2, 4, 16, 16)


def _draw(noise: Noise, samples: torch.Tensor = SHAPE, batch_index=None) -> torch.Tensor:
    return noise.draw(samples, batch_index)[0]


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return math.acos(float(torch.dot(a, b) / (a.norm() * b.norm())))


def test_the_ends_are_the_two_seeds_noise():
    base, other = _draw(Noise(5)), _draw(Noise(9))
    assert torch.equal(_draw(cs.variation_noise(CTX, 5, 9, 0.0)[0]), base)
    assert torch.allclose(_draw(cs.variation_noise(CTX, 5, 9, 1.0)[0]), other, atol=1e-5)


@pytest.mark.parametrize("strength", [0.1, 0.5, 0.8])
def test_in_between_the_noise_turns_along_the_great_circle(strength):
    base, other = _draw(Noise(5)), _draw(Noise(9))
    mixed = _draw(cs.variation_noise(CTX, 5, 9, strength)[0])
    for k in range(2):
        whole = _angle(base[k], other[k])
        assert _angle(base[k], mixed[k]) == pytest.approx(strength * whole, rel=1e-4)
        assert _angle(mixed[k], other[k]) == pytest.approx((1 - strength) * whole, rel=1e-4)
        # Gaussian-sized all the way; a straight blend of two independent draws is not.
        assert float(mixed[k].std()) == pytest.approx(float(base[k].std()), abs=0.03)
    straight = (1 - 0.5) * base + 0.5 * other
    assert float(straight.std()) < 0.8  # what the great circle avoids


def test_slerp_of_parallel_vectors_blends_them():
    a = torch.ones(1, 2, 2)
    assert torch.allclose(slerp(a, 3 * a, 0.5), 2 * torch.ones(1, 1, 2, 2))


def test_each_image_of_a_batch_is_its_single_run():
    batch = _draw(cs.variation_noise(CTX, 5, 9, 0.3)[0])
    second = _draw(cs.variation_noise(CTX, 6, 10, 0.3)[0], SHAPE[:1])
    assert torch.allclose(batch[1:], second, atol=1e-6)
    assert not torch.allclose(batch[:1], second, atol=1e-3)


def test_the_sampler_s_later_noise_still_comes_from_noise_seed():
    _, generators = cs.variation_noise(CTX, 5, 9, 0.3)[0].draw(SHAPE)
    _, plain = Noise(5).draw(SHAPE)
    assert torch.equal(torch.randn(3, generator=generators[0]), torch.randn(3, generator=plain[0]))


def test_a_strength_outside_zero_to_one_names_the_input():
    with pytest.raises(NodeError) as err:
        cs.variation_noise(CTX, 5, 9, 1.5)
    assert err.value.input_name == "variation_strength"


def test_variations_of_one_image_through_sampler_custom_advanced(sd1):
    latent = {"samples": torch.zeros_like(sd1.init)}
    guider, = cs.cfg_guider(CTX, sd1.model, sd1.pos, sd1.neg, 6.0)
    spec, = cs.ksampler_select(CTX, "euler")
    sigmas, = cs.basic_scheduler(CTX, sd1.model, "karras", 6, 1.0)

    def image(noise):
        return sd1.decode(cs.sampler_custom_advanced(CTX, noise, guider, spec, sigmas, latent)[0]["samples"])

    base = image(cs.random_noise(CTX, 5)[0])
    assert torch.equal(image(cs.variation_noise(CTX, 5, 9, 0.0)[0]), base)
    drift = [float((image(cs.variation_noise(CTX, 5, 9, s)[0]) - base).abs().mean()) for s in (0.05, 0.3, 1.0)]
    assert 0 < drift[0] < drift[1] < drift[2], drift
    assert torch.allclose(image(cs.variation_noise(CTX, 5, 9, 1.0)[0]), image(cs.random_noise(CTX, 9)[0]), atol=1e-3)
