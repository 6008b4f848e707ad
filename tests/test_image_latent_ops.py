"""Image and latent operations: sizes, values worked out by hand, ComfyUI's rules, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.context import Environment, NodeError
from node_call import Called, call
from nodes import image_ops, latent_ops
from nodes.resample import bislerp


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path / "data")


def ramp_image(h: int, w: int, c: int = 3) -> torch.Tensor:
    return torch.linspace(0, 1, h * w * c).reshape(1, h, w, c)


# -- images -----------------------------------------------------------------------------------


def test_image_scale_sizes_crop_and_methods(env):
    image = ramp_image(20, 40)
    (out,) = call(image_ops.image_scale, env, image=image, upscale_method="bilinear", width=0, height=10,
                  crop="disabled")
    assert out.shape == (1, 10, 20, 3)  # width follows the aspect ratio
    (same,) = call(image_ops.image_scale, env, image=image, upscale_method="bilinear", width=0, height=0,
                   crop="disabled")
    assert same is image
    # centre crop to a square keeps columns 10..29, then nearest-exact at the same size is a copy
    (sq,) = call(image_ops.image_scale, env, image=image, upscale_method="nearest-exact", width=20, height=20,
                 crop="center")
    assert torch.equal(sq, image[:, :, 10:30])
    # lanczos is Pillow's, through 8-bit
    (lz,) = call(image_ops.image_scale, env, image=image, upscale_method="lanczos", width=13, height=7,
                 crop="disabled")
    pil = Image.fromarray(np.rint(image[0].numpy() * 255).astype(np.uint8)).resize((13, 7), Image.Resampling.LANCZOS)
    assert np.array_equal(np.rint(lz[0].numpy() * 255).astype(np.uint8), np.asarray(pil))
    (by,) = call(image_ops.image_scale_by, env, image=image, upscale_method="area", scale_by=0.25)
    assert by.shape == (1, 5, 10, 3)
    (mp,) = call(image_ops.image_scale_to_total_pixels, env, image=image, upscale_method="bicubic",
                 megapixels=0.01, resolution_steps=8)
    # sqrt(0.01 * 1024^2 / 800) = 3.62: 40 -> 144.8 -> 144, 20 -> 72.4 -> 72
    assert mp.shape == (1, 72, 144, 3)


def test_scaling_beyond_the_budget_is_refused(env):
    env.settings.max_image_pixels = 64 * 64
    with pytest.raises(NodeError, match=r"128x128 = 16384 pixels, more than the budget of 4096") as err:
        call(image_ops.image_scale_by, env, image=ramp_image(32, 32), upscale_method="bilinear", scale_by=4.0)
    assert err.value.input_name == "scale_by"
    with pytest.raises(NodeError, match="budget") as err:
        call(latent_ops.latent_upscale_by, env, samples={"samples": torch.zeros(1, 4, 8, 8)},
             upscale_method="bislerp", scale_by=2.0)
    assert err.value.input_name == "scale_by"


def test_crop_invert_blend_batch(env):
    image = ramp_image(6, 8)
    (crop,) = call(image_ops.image_crop, env, image=image, width=3, height=2, x=4, y=1)
    assert torch.equal(crop, image[:, 1:3, 4:7])
    rec = Called()
    (edge,) = call(image_ops.image_crop, env, rec, image=image, width=4, height=4, x=99, y=0)
    assert torch.equal(edge, image[:, 0:4, 7:8]) and "past the image's edge" in rec.messages[0]

    rgba = torch.rand(1, 2, 2, 4)
    (inv,) = call(image_ops.image_invert, env, image=rgba)
    assert torch.allclose(inv[..., :3], 1 - rgba[..., :3]) and torch.equal(inv[..., 3], rgba[..., 3])

    a = torch.tensor([0.2, 0.6, 0.9]).view(1, 1, 1, 3)
    b = torch.tensor([0.5, 0.5, 0.1]).view(1, 1, 1, 3)
    cases = {"normal": [0.5, 0.5, 0.1], "multiply": [0.1, 0.3, 0.09], "screen": [0.6, 0.8, 0.91],
             "overlay": [0.2, 0.6, 0.82], "difference": [0.0, 0.1, 0.8]}  # a - b clamps at 0
    for mode, want in cases.items():
        (out,) = call(image_ops.image_blend, env, image1=a, image2=b, blend_factor=1.0, blend_mode=mode)
        assert torch.allclose(out.flatten(), torch.tensor(want), atol=1e-6), mode
    (half,) = call(image_ops.image_blend, env, image1=a, image2=b, blend_factor=0.5, blend_mode="normal")
    assert torch.allclose(half.flatten(), (a + b).flatten() / 2)

    rec = Called()
    (batch,) = call(image_ops.image_batch, env, rec, image1=torch.zeros(2, 8, 8, 3), image2=torch.ones(1, 4, 4, 3))
    assert batch.shape == (3, 8, 8, 3) and float(batch[2].min()) == 1.0
    assert "image2 scaled from 4x4 to 8x8" in rec.messages[0]
    (rep,) = call(image_ops.repeat_image_batch, env, image=torch.rand(2, 3, 3, 3), amount=3)
    assert rep.shape == (6, 3, 3, 3) and torch.equal(rep[4], rep[0])
    frames = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 2, 2, 3)
    (last,) = call(image_ops.image_from_batch, env, image=frames, batch_index=-2, length=9)
    assert last[:, 0, 0, 0].tolist() == [3.0, 4.0]


# -- latents ----------------------------------------------------------------------------------


def test_latent_upscale_sizes(env):
    latent = {"samples": torch.rand(1, 4, 8, 12), "batch_index": [3]}
    (out,) = call(latent_ops.latent_upscale, env, samples=latent, upscale_method="nearest-exact", width=0,
                  height=128, crop="disabled")
    assert out["samples"].shape == (1, 4, 16, 24) and out["batch_index"] == [3]
    (out,) = call(latent_ops.latent_upscale, env, samples=latent, upscale_method="bilinear", width=16, height=16,
                  crop="center")
    assert out["samples"].shape == (1, 4, 8, 8)  # each side at least 64 px, as in ComfyUI
    (out,) = call(latent_ops.latent_upscale_by, env, samples=latent, upscale_method="bislerp", scale_by=1.5)
    assert out["samples"].shape == (1, 4, 12, 18)
    assert latent["samples"].shape == (1, 4, 8, 12)  # the input is not modified


def test_bislerp_is_bilinear_for_parallel_vectors_and_keeps_lengths_for_opposite_directions():
    direction = torch.tensor([1.0, 2.0, -1.0, 0.5])
    lengths = torch.rand(1, 1, 5, 7) + 0.5
    x = direction.view(1, 4, 1, 1) * lengths
    ours = bislerp(x, 11, 9)
    ref = F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False)
    assert torch.allclose(ours, ref, atol=1e-5)
    # two orthogonal unit vectors half way: the slerp stays on the unit circle (bilinear would shrink to 0.707)
    pair = torch.zeros(1, 2, 1, 2)
    pair[0, 0, 0, 0] = 1.0
    pair[0, 1, 0, 1] = 1.0
    mid = bislerp(pair, 3, 1)[0, :, 0, 1]
    assert torch.allclose(mid.norm(), torch.tensor(1.0), atol=1e-5) and torch.allclose(mid[0], mid[1])


def test_latent_composite_feather_by_hand(env):
    dst = {"samples": torch.zeros(1, 1, 4, 6)}
    src = {"samples": torch.ones(1, 1, 2, 3)}
    (out,) = call(latent_ops.latent_composite, env, samples_to=dst, samples_from=src, x=16, y=8, feather=16)
    # placed at cells (x=2, y=1); feather 2 cells on every side inside the destination:
    # rows get 1/2, 1/2 (top ramp t=0 then bottom ramp t=0 on a 2-row patch, and 2/2), columns 1/2, 1, 1/2
    got = out["samples"][0, 0]
    row_w = torch.tensor([0.5 * 1.0, 1.0 * 0.5])   # row 0: top t=0 (1/2), bottom t=1 (2/2); row 1: the reverse
    col_w = torch.tensor([0.5 * 1.0, 1.0 * 1.0, 1.0 * 0.5])
    expected = torch.zeros(4, 6)
    expected[1:3, 2:5] = row_w[:, None] * col_w[None, :]
    assert torch.allclose(got, expected)
    (hard,) = call(latent_ops.latent_composite, env, samples_to=dst, samples_from=src, x=40, y=0, feather=0)
    assert float(hard["samples"][0, 0, :2, 5].min()) == 1.0 and float(hard["samples"].sum()) == 2.0  # cut at the edge


def test_latent_blend_and_batches(env):
    a, b = {"samples": torch.full((2, 4, 2, 2), 1.0)}, {"samples": torch.full((1, 4, 4, 4), 3.0)}
    rec = Called()
    (out,) = call(latent_ops.latent_blend, env, rec, samples1=a, samples2=b, blend_factor=0.25)
    assert out["samples"].shape == (2, 4, 2, 2) and torch.allclose(out["samples"], torch.full((2, 4, 2, 2), 2.5))
    assert "samples2 scaled" in rec.messages[0]

    base = {"samples": torch.arange(2.0).view(2, 1, 1, 1).expand(2, 4, 2, 2).clone()}
    (rep,) = call(latent_ops.repeat_latent_batch, env, samples=base, amount=3)
    assert rep["samples"][:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1] and "batch_index" not in rep
    (picked,) = call(latent_ops.latent_from_batch, env, samples=rep, batch_index=3, length=2)
    assert picked["samples"][:, 0, 0, 0].tolist() == [1, 0] and picked["batch_index"] == [3, 4]
    (again,) = call(latent_ops.repeat_latent_batch, env, samples=picked, amount=2)
    assert again["batch_index"] == [3, 4, 5, 6]  # the copies continue the seeds instead of repeating them


def test_latent_ops_refuse_a_latent_that_went_through_add_noise(env):
    noised = {"samples": torch.zeros(1, 4, 8, 8), "noise": torch.zeros(1, 4, 8, 8), "strength": 0.5, "seed": 1}
    with pytest.raises(NodeError, match="put RepeatLatentBatch before AddNoise") as err:
        call(latent_ops.repeat_latent_batch, env, samples=noised, amount=2)
    assert err.value.input_name == "samples"
    with pytest.raises(NodeError, match="expected a LATENT"):
        call(latent_ops.latent_blend, env, samples1=torch.zeros(1), samples2=noised, blend_factor=0.5)


def test_image_flip_rotate_and_empty_image(env):
    image = ramp_image(2, 3)
    (mirrored,) = call(image_ops.image_flip, env, image=image, flip_method="y-axis: horizontally")
    assert torch.equal(mirrored, image.flip(2))
    (upside,) = call(image_ops.image_flip, env, image=image, flip_method="x-axis: vertically")
    assert torch.equal(upside[:, 0], image[:, 1])
    (turned,) = call(image_ops.image_rotate, env, image=image, rotation="90 degrees")
    assert turned.shape == (1, 3, 2, 3)
    assert torch.equal(turned[0, 0, -1], image[0, 0, 0])  # clockwise: top-left goes to top-right
    (back,) = call(image_ops.image_rotate, env, image=turned, rotation="270 degrees")
    assert torch.equal(back, image)
    (same,) = call(image_ops.image_rotate, env, image=image, rotation="none")
    assert torch.equal(same, image)
    (orange,) = call(image_ops.empty_image, env, width=5, height=4, batch_size=2, color=0xFF8000)
    assert orange.shape == (2, 4, 5, 3)
    assert torch.allclose(orange[1, 3, 4], torch.tensor([1.0, 128 / 255, 0.0]))
    env.settings.max_image_pixels = 100
    with pytest.raises(NodeError) as err:
        call(image_ops.empty_image, env, width=20, height=20, batch_size=1, color=0)
    assert err.value.input_name == "width"
    with pytest.raises(NodeError) as err:
        call(image_ops.image_flip, env, image=image, flip_method="diagonal")
    assert err.value.input_name == "flip_method"
