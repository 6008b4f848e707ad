"""DifferentialDiffusion (nodes/model_patches.py, Hold.mask_at in nodes/samplers/hold.py)."""
from __future__ import annotations

import pytest
import torch

from engine.context import NodeError
from nodes.model_patches import differential_diffusion
from nodes.samplers.hold import Hold
from nodes.samplers.model_sampling import for_model
from nodes.sampling import ksampler
from test_sampling import Recorder, sd1  # noqa: F401 (a fixture)

LEVELS = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).reshape(1, 1, 1, 5)


def _hold(model, strength, end_sigma=0.0) -> Hold:
    zeros = torch.zeros(1, 4, 1, 5)
    return Hold(zeros, zeros, LEVELS, for_model(model), strength=strength, end_sigma=end_sigma)


def test_the_threshold_falls_with_the_timestep_from_the_first_level_to_the_last(sd1):
    sampling = for_model(sd1.model)
    hold = _hold(sd1.model, 1.0)
    first = float(sampling.schedule.sigma(999.0))
    assert hold.mask_at(first).flatten().tolist() == [0, 0, 0, 0, 1]  # threshold 1: only full mask is free
    last = float(sampling.schedule.timestep(sampling.sigma_min))
    for timestep, free in ((last + 0.6 * (999.0 - last), [0, 0, 0, 1, 1]),   # threshold 0.6
                           (last + 0.3 * (999.0 - last), [0, 0, 1, 1, 1]),   # 0.3
                           (last + 0.1 * (999.0 - last), [0, 1, 1, 1, 1])):  # 0.1
        sigma = float(sampling.schedule.sigma(timestep))
        assert hold.mask_at(sigma).flatten().tolist() == free, timestep
    half = _hold(sd1.model, 0.5)
    half.mask_at(first)
    sigma = float(sampling.schedule.sigma(last + 0.6 * (999.0 - last)))
    assert half.mask_at(sigma).flatten().tolist() == pytest.approx([0, 0.125, 0.25, 0.875, 1.0])
    assert torch.equal(_hold(sd1.model, None).mask_at(first), LEVELS)  # without it: the soft mask


def test_a_split_run_reaches_threshold_zero_at_its_own_end(sd1):
    sampling = for_model(sd1.model)
    hold = _hold(sd1.model, 1.0, end_sigma=2.0)
    hold.mask_at(10.0)
    assert hold.mask_at(2.0).flatten().tolist() == [1, 1, 1, 1, 1]  # mask >= 0 everywhere
    assert hold.mask_at(10.0).flatten().tolist() == [0, 0, 0, 0, 1]
    assert sampling.sigma_min < 2.0


def test_ksampler_with_it_keeps_the_unmasked_region_and_repaints_soft_regions_late(sd1):
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 0.3  # a soft region
    mask[..., :, 48:] = 1.0
    latent = {"samples": sd1.init, "noise_mask": mask}

    def run(model):
        out, = ksampler(Recorder().ctx, model, 3, 8, 5.0, "euler", "normal", sd1.pos, sd1.neg, latent, 1.0)
        return out["samples"]

    plain = run(sd1.model)
    (patched,) = differential_diffusion(Recorder().ctx, sd1.model, 1.0)
    ours = run(patched)
    assert torch.equal(ours[..., :4], sd1.init[..., :4]) and torch.equal(plain[..., :4], sd1.init[..., :4])
    assert (ours[..., 6:] - sd1.init[..., 6:]).abs().max() > 0.1  # the full-mask region was repainted
    # the soft region: blended as it is without DD; with DD free only over the last 30 % of
    # the run, so it stays much closer to the input than the full-mask region does
    soft = (ours[..., 4:6] - sd1.init[..., 4:6]).abs().mean()
    full = (ours[..., 6:] - sd1.init[..., 6:]).abs().mean()
    assert 0 < soft < 0.8 * full
    assert not torch.allclose(ours, plain)
    assert sd1.model.patches.differential_diffusion is None  # the handle it was given is unchanged


def test_strength_out_of_range_is_refused(sd1):
    with pytest.raises(NodeError) as err:
        differential_diffusion(Recorder().ctx, sd1.model, 1.5)
    assert err.value.input_name == "strength"
