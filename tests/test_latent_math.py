"""LatentAdd/Subtract/Multiply/Interpolate/Batch/BatchSeedBehavior/Flip/Rotate/Crop (nodes/latent_math.py)."""
from __future__ import annotations

import pytest
import torch

from engine.context import NodeError
from nodes import latent_math as lm
from test_sampling import Recorder

CTX = Recorder().ctx


def _lat(seed: int, shape=(1, 4, 4, 6)) -> dict:
    return {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(seed))}


def test_arithmetic_brings_the_second_latent_to_the_firsts_shape():
    a, b = _lat(1), _lat(2)
    assert torch.equal(lm.latent_add(CTX, a, b)[0]["samples"], a["samples"] + b["samples"])
    assert torch.equal(lm.latent_subtract(CTX, a, b)[0]["samples"], a["samples"] - b["samples"])
    assert torch.equal(lm.latent_multiply(CTX, a, -0.5)[0]["samples"], a["samples"] * -0.5)
    rec = Recorder()
    big = lm.latent_add(rec.ctx, _lat(1, (2, 4, 4, 6)), _lat(3, (1, 4, 8, 12)))[0]["samples"]
    assert big.shape == (2, 4, 4, 6) and any("scaled" in m for m in rec.messages)
    with pytest.raises(NodeError) as err:
        lm.latent_add(CTX, a, _lat(2, (1, 16, 4, 6)))
    assert err.value.input_name == "samples2"
    noised = {**a, "noise": torch.zeros(1)}
    with pytest.raises(NodeError) as err:
        lm.latent_multiply(CTX, noised, 2.0)
    assert "AddNoise" in str(err.value)


def test_interpolate_mixes_direction_and_length_apart():
    a, b = _lat(1), _lat(2)
    assert torch.allclose(lm.latent_interpolate(CTX, a, b, 1.0)[0]["samples"], a["samples"], atol=1e-6)
    assert torch.allclose(lm.latent_interpolate(CTX, a, b, 0.0)[0]["samples"], b["samples"], atol=1e-6)
    mid = lm.latent_interpolate(CTX, a, b, 0.5)[0]["samples"]
    la, lb = a["samples"].norm(dim=1), b["samples"].norm(dim=1)
    assert torch.allclose(mid.norm(dim=1), (la + lb) / 2, atol=1e-5)  # lengths mix linearly
    linear = (a["samples"] + b["samples"]) / 2
    assert bool((linear.norm(dim=1) <= mid.norm(dim=1) + 1e-6).all())  # a plain blend shrinks them


def test_batch_keeps_each_images_seed_and_mask_and_seed_behavior_sets_them():
    a = _lat(1, (2, 4, 4, 6))
    b = {**_lat(2), "batch_index": [5], "noise_mask": torch.zeros(1, 1, 32, 48)}
    out = lm.latent_batch(CTX, a, b)[0]
    assert out["samples"].shape == (3, 4, 4, 6) and out["batch_index"] == [0, 1, 5]
    assert torch.equal(out["samples"][2], b["samples"][0])
    assert out["noise_mask"].shape == (3, 1, 32, 48)
    assert bool((out["noise_mask"][:2] == 1).all()) and bool((out["noise_mask"][2] == 0).all())
    fixed = lm.latent_batch_seed_behavior(CTX, {**a, "batch_index": [3, 4]}, "fixed")[0]
    assert fixed["batch_index"] == [3, 3]
    assert "batch_index" not in lm.latent_batch_seed_behavior(CTX, {**a, "batch_index": [3, 4]}, "random")[0]


def test_fixed_seed_behavior_gives_every_image_the_same_noise():
    from nodes.latent import add_noise
    from test_sampling import Tiny

    tiny = Tiny("sd1")
    latent = lm.latent_batch_seed_behavior(CTX, {"samples": torch.zeros(3, 4, 8, 8)}, "fixed")[0]
    noised, = add_noise(CTX, tiny.model, latent, 0.5, 9)
    assert torch.equal(noised["noise"][0], noised["noise"][2])
    plain, = add_noise(CTX, tiny.model, {"samples": torch.zeros(3, 4, 8, 8)}, 0.5, 9)
    assert not torch.equal(plain["noise"][0], plain["noise"][2])


def test_flip_rotate_and_crop_move_the_noise_mask_with_the_picture():
    latent = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 1, 2, 3).repeat(1, 4, 1, 1)
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., :8, :8] = 1.0  # the top-left cell
    src = {"samples": latent, "noise_mask": mask}
    flipped = lm.latent_flip(CTX, src, "y-axis: horizontally")[0]
    assert torch.equal(flipped["samples"][0, 0, 0], torch.tensor([2.0, 1.0, 0.0]))
    assert flipped["noise_mask"][0, 0, 0, -1] == 1 and flipped["noise_mask"][0, 0, 0, 0] == 0
    upside = lm.latent_flip(CTX, src, "x-axis: vertically")[0]
    assert torch.equal(upside["samples"][0, 0, :, 0], torch.tensor([3.0, 0.0]))
    turned = lm.latent_rotate(CTX, src, "90 degrees")[0]
    assert turned["samples"].shape == (1, 4, 3, 2) and turned["noise_mask"].shape == (1, 1, 24, 16)
    # clockwise: the top-left cell goes to the top-right
    assert turned["samples"][0, 0, 0, 1] == 0.0 and turned["noise_mask"][0, 0, 0, -1] == 1
    assert torch.equal(lm.latent_rotate(CTX, src, "none")[0]["samples"], latent)
    cropped = lm.latent_crop(CTX, src, 64, 64, 8, 0)[0]
    assert torch.equal(cropped["samples"], latent[..., 0:2, 1:3])
    assert cropped["noise_mask"].shape == (1, 1, 16, 16) and cropped["noise_mask"].max() == 0
    edge = lm.latent_crop(CTX, src, 64, 64, 800, 800)[0]["samples"]
    assert edge.shape[-2:] == (1, 1) and edge[0, 0, 0, 0] == 5.0  # moved back to the last cell
    with pytest.raises(NodeError) as err:
        lm.latent_rotate(CTX, src, "45 degrees")
    assert err.value.input_name == "rotation"
