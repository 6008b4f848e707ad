"""Mask nodes against masks worked out by hand, and their bad-input messages.

Each node is called directly (tests/node_call.py) with small masks whose expected
result is written out element by element; LoadImageMask reads real PNG files.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import Environment, NodeError
from node_call import Called, call
from nodes import image_ops, latent_ops, masks


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path / "data")


def m(rows) -> torch.Tensor:
    """A [1, H, W] mask from a list of rows."""
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def dot5() -> torch.Tensor:
    x = torch.zeros(1, 5, 5)
    x[0, 2, 2] = 1.0
    return x


def test_grow_mask_cross_and_square_by_hand(env):
    (grown,) = call(masks.grow_mask, env, mask=dot5(), expand=1, tapered_corners=True)
    assert torch.equal(grown, m([[0, 0, 0, 0, 0],
                                 [0, 0, 1, 0, 0],
                                 [0, 1, 1, 1, 0],
                                 [0, 0, 1, 0, 0],
                                 [0, 0, 0, 0, 0]]))
    (grown,) = call(masks.grow_mask, env, mask=dot5(), expand=2, tapered_corners=True)
    assert torch.equal(grown, m([[0, 0, 1, 0, 0],
                                 [0, 1, 1, 1, 0],
                                 [1, 1, 1, 1, 1],
                                 [0, 1, 1, 1, 0],
                                 [0, 0, 1, 0, 0]]))
    (grown,) = call(masks.grow_mask, env, mask=dot5(), expand=1, tapered_corners=False)
    expected = torch.zeros(1, 5, 5)
    expected[0, 1:4, 1:4] = 1
    assert torch.equal(grown, expected)
    # shrinking the 3x3 square by one gives the dot back; by two, nothing
    (shrunk,) = call(masks.grow_mask, env, mask=expected, expand=-1, tapered_corners=False)
    assert torch.equal(shrunk, dot5())
    (gone,) = call(masks.grow_mask, env, mask=expected, expand=-2, tapered_corners=True)
    assert float(gone.sum()) == 0.0
    # grey values: dilation takes the neighbourhood's maximum
    (grey,) = call(masks.grow_mask, env, mask=m([[0.2, 0.0, 0.7]]), expand=1, tapered_corners=True)
    assert torch.allclose(grey, m([[0.2, 0.7, 0.7]]))


def test_grow_mask_equals_scipy_grey_dilation_and_erosion(env):
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = (rng.random((1, 13, 17)) > 0.7).astype(np.float32) * rng.random((1, 13, 17)).astype(np.float32)
    for tapered in (True, False):
        c = 0 if tapered else 1
        kernel = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
        for expand in (3, -2):
            ref = mask[0]
            for _ in range(abs(expand)):
                ref = (ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion)(ref, footprint=kernel)
            (out,) = call(masks.grow_mask, env, mask=torch.from_numpy(mask), expand=expand, tapered_corners=tapered)
            assert np.array_equal(out[0].numpy(), ref), (tapered, expand)


def test_feather_mask_by_hand(env):
    ones = torch.ones(1, 3, 4)
    (out,) = call(masks.feather_mask, env, mask=ones, left=2, top=0, right=1, bottom=3)
    # columns: left ramp 1/2, 2/2 on columns 0, 1; right=1 multiplies the last column by 1/1
    # rows: bottom=3 multiplies the last three rows (from the bottom) by 1/3, 2/3, 3/3
    cols = torch.tensor([0.5, 1.0, 1.0, 1.0])
    rows = torch.tensor([1.0, 2 / 3, 1 / 3])
    assert torch.allclose(out[0], rows[:, None] * cols[None, :])


def test_threshold_invert_solid_and_conversions(env):
    mask = m([[0.2, 0.5, 0.9]])
    assert torch.equal(call(masks.threshold_mask, env, mask=mask, value=0.5)[0], m([[0, 0, 1]]))
    assert torch.allclose(call(masks.invert_mask, env, mask=mask)[0], m([[0.8, 0.5, 0.1]]))
    (solid,) = call(masks.solid_mask, env, value=0.25, width=3, height=2)
    assert solid.shape == (1, 2, 3) and float(solid.min()) == float(solid.max()) == 0.25
    (image,) = call(masks.mask_to_image, env, mask=mask)
    assert image.shape == (1, 1, 3, 3) and torch.equal(image[..., 1], mask)
    rgba = torch.rand(2, 4, 5, 4)
    for i, channel in enumerate(masks.CHANNELS):
        (chan,) = call(masks.image_to_mask, env, image=rgba, channel=channel)
        assert torch.equal(chan, rgba[..., i])
    with pytest.raises(NodeError, match="no alpha channel") as err:
        call(masks.image_to_mask, env, image=rgba[..., :3], channel="alpha")
    assert err.value.input_name == "channel"


def test_mask_composite_operations_by_hand(env):
    dest = m([[0.5, 0.5, 0.5],
              [0.5, 1.0, 0.0]])
    src = m([[1.0, 0.2]])
    expected = {
        "multiply": [[0.5, 0.5, 0.5], [0.5, 1.0, 0.0]],
        "add": [[0.5, 0.5, 0.5], [0.5, 1.0, 0.2]],        # 1.0 + 1.0 clamps to 1
        "subtract": [[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]],   # 0 - 0.2 clamps to 0
        "and": [[0.5, 0.5, 0.5], [0.5, 1.0, 0.0]],
        "or": [[0.5, 0.5, 0.5], [0.5, 1.0, 0.0]],         # round(0.2) = 0, round(0) = 0
        "xor": [[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]],
    }
    for op, rows in expected.items():
        (out,) = call(masks.mask_composite, env, destination=dest, source=src, x=1, y=1, operation=op)
        assert torch.allclose(out, m(rows)), op
    rec = Called()
    (out,) = call(masks.mask_composite, env, rec, destination=dest, source=src, x=3, y=0, operation="add")
    assert torch.equal(out, dest) and "nothing is combined" in rec.messages[0]


def test_crop_mask(env):
    mask = torch.arange(20, dtype=torch.float32).reshape(1, 4, 5) / 20
    (out,) = call(masks.crop_mask, env, mask=mask, x=1, y=2, width=3, height=2)
    assert torch.equal(out, mask[:, 2:4, 1:4])
    rec = Called()
    (out,) = call(masks.crop_mask, env, rec, mask=mask, x=3, y=0, width=4, height=4)
    assert out.shape == (1, 4, 2) and "past the mask's edge" in rec.messages[0]
    with pytest.raises(NodeError, match="outside the 5x4 mask") as err:
        call(masks.crop_mask, env, mask=mask, x=5, y=0, width=1, height=1)
    assert err.value.input_name == "x"


def test_load_image_mask_channels_and_alpha_convention(env):
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 255          # red everywhere
    rgba[..., 1] = 51           # green 0.2
    rgba[:, :5, 3] = 0          # left half transparent: the region to repaint
    rgba[:, 5:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(env.paths.input.root / "m.png")
    (alpha,) = call(masks.load_image_mask, env, image="m.png", channel="alpha")
    assert alpha.shape == (1, 8, 10)
    assert float(alpha[0, :, :5].min()) == 1.0 and float(alpha[0, :, 5:].max()) == 0.0
    (red,) = call(masks.load_image_mask, env, image="m.png", channel="red")
    assert float(red.min()) == 1.0  # stored colours, not flattened onto a background
    (green,) = call(masks.load_image_mask, env, image="m.png", channel="green")
    assert torch.allclose(green, torch.full_like(green, 0.2))
    Image.new("RGB", (8, 8), (0, 0, 0)).save(env.paths.input.root / "opaque.png")
    rec = Called()
    (empty,) = call(masks.load_image_mask, env, rec, image="opaque.png", channel="alpha")
    assert empty.shape == (1, 64, 64) and float(empty.sum()) == 0.0
    assert "no transparent pixels: the mask is empty" in rec.messages[0]


# -- the mask size rule (nodes/masking.py), through the nodes that take a mask --------------


def test_a_mask_of_another_size_is_resized_when_its_shape_agrees_and_refused_otherwise(env):
    dest = torch.zeros(1, 8, 8, 3)
    src = torch.ones(1, 8, 8, 3)
    half = torch.zeros(1, 4, 4)
    half[:, :, :2] = 1.0  # left half, drawn at half the resolution
    rec = Called()
    (out,) = call(image_ops.image_composite_masked, env, rec, destination=dest, source=src, x=0, y=0,
                  resize_source=False, mask=half)
    assert "mask resized from 4x4 to 8x8" in " ".join(rec.messages)
    assert float(out[0, :, :3].min()) == 1.0 and float(out[0, :, 5:].max()) == 0.0
    wide = torch.zeros(1, 4, 8)
    wide[:, :, :3] = 1.0
    with pytest.raises(NodeError, match="the mask is 8x4 but the source is 8x8") as err:
        call(image_ops.image_composite_masked, env, destination=dest, source=src, x=0, y=0, mask=wide)
    assert err.value.input_name == "mask"
    # a uniform mask has no shape to distort: LoadImage's 64x64 placeholder is fine anywhere
    rec = Called()
    (out,) = call(image_ops.image_composite_masked, env, rec, destination=dest, source=src, x=0, y=0,
                  mask=torch.zeros(1, 64, 64))
    assert torch.equal(out, dest) and "the mask is empty: nothing is composited" in " ".join(rec.messages)


def test_image_composite_masked_by_hand(env):
    dest = torch.zeros(1, 3, 4, 1).expand(1, 3, 4, 3).clone()
    src = torch.ones(1, 2, 2, 3)
    mask = m([[1.0, 0.5], [0.0, 1.0]])
    (out,) = call(image_ops.image_composite_masked, env, destination=dest, source=src, x=2, y=1, mask=mask)
    expected = torch.zeros(3, 4)
    expected[1, 2], expected[1, 3], expected[2, 2], expected[2, 3] = 1.0, 0.5, 0.0, 1.0
    assert torch.allclose(out[0, ..., 0], expected) and torch.equal(out[..., 0], out[..., 2])


def test_latent_composite_masked_fits_a_pixel_mask_to_the_latent(env):
    dest = {"samples": torch.zeros(1, 4, 4, 4)}
    src = {"samples": torch.ones(1, 4, 4, 4)}
    pixel_mask = torch.zeros(1, 32, 32)
    pixel_mask[:, :16, :] = 1.0  # top half, at pixel resolution
    rec = Called()
    (out,) = call(latent_ops.latent_composite_masked, env, rec, destination=dest, source=src, x=0, y=0,
                  resize_source=False, mask=pixel_mask)
    assert "mask resized from 32x32 to 4x4" in rec.messages[0]
    assert float(out["samples"][0, :, :2].min()) == 1.0 and float(out["samples"][0, :, 2:].max()) == 0.0


def test_pad_for_outpaint_mask_by_hand_and_budget(env):
    image = torch.full((1, 6, 6, 3), 0.25)
    (out, mask) = call(image_ops.image_pad_for_outpaint, env, image=image, left=2, top=0, right=0, bottom=0,
                       feathering=2)
    assert out.shape == (1, 6, 8, 3) and float(out[0, :, :2].min()) == 0.5 == float(out[0, :, :2].max())
    assert torch.equal(out[:, :, 2:], image)
    # new columns 0-1 are 1; inside, distance d from the padded left side: d=0 -> ((2-0)/2)^2 = 1, d=1 -> 1/4
    expected = torch.zeros(6, 8)
    expected[:, :2] = 1.0
    expected[:, 2] = 1.0
    expected[:, 3] = 0.25
    assert torch.allclose(mask[0], expected)
    env.settings.max_image_pixels = 100
    with pytest.raises(NodeError, match="budget of 100 pixels") as err:
        call(image_ops.image_pad_for_outpaint, env, image=image, left=0, top=0, right=0, bottom=64, feathering=0)
    assert err.value.input_name == "bottom"
