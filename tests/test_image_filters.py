"""ImageBlur, ImageSharpen and ImageQuantize (nodes/image_filters.py) against what each must do."""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes import image_filters as f
from test_sampling import Recorder

CTX = Recorder().ctx


def _dot(size: int = 9) -> torch.Tensor:
    image = torch.zeros(1, size, size, 3)
    image[0, size // 2, size // 2] = 1.0
    return image


def test_blur_spreads_a_dot_into_comfyuis_kernel_and_keeps_flat_colour_at_the_edges():
    (out,) = f.image_blur(CTX, _dot(), 2, 1.0)
    grid = [-1.0, -0.5, 0.0, 0.5, 1.0]  # the kernel spans [-1, 1] whatever the radius
    weights = [[math.exp(-(a * a + b * b) / 2) for b in grid] for a in grid]
    total = sum(map(sum, weights))
    expected = torch.tensor(weights) / total
    assert torch.allclose(out[0, 2:7, 2:7, 0], expected, atol=1e-6)
    assert torch.allclose(out[..., 0], out[..., 2]) and out[0, 0, 0, 0] == 0
    flat = torch.full((1, 6, 7, 3), 0.4)
    (kept,) = f.image_blur(CTX, flat, 3, 2.0)  # mirrored edges: no dark border as zero padding gives
    assert torch.allclose(kept, flat, atol=1e-6)
    (tiny,) = f.image_blur(CTX, torch.full((1, 2, 2, 3), 0.7), 5, 1.0)  # too small to mirror: clamped
    assert torch.allclose(tiny, torch.full((1, 2, 2, 3), 0.7), atol=1e-6)


def test_sharpen_pushes_an_edge_apart_keeps_flat_areas_and_alpha_zero_is_identity():
    step = torch.full((1, 8, 8, 3), 0.3)
    step[:, :, 4:] = 0.7
    (sharp,) = f.image_sharpen(CTX, step, 1, 1.0, 0.5)
    assert sharp[0, 0, 3, 0] < 0.3 - 0.05 and sharp[0, 0, 4, 0] > 0.7 + 0.05  # both sides of the edge
    assert torch.allclose(sharp[:, :, :2], step[:, :, :2], atol=1e-6)  # flat far from it
    assert sharp.min() >= 0 and sharp.max() <= 1
    (same,) = f.image_sharpen(CTX, step, 2, 1.0, 0.0)
    assert torch.allclose(same, step, atol=1e-6)
    rgba = torch.cat([step, torch.full((1, 8, 8, 1), 0.25)], dim=-1)
    (with_alpha,) = f.image_sharpen(CTX, rgba, 1, 1.0, 0.5)
    assert torch.allclose(with_alpha[..., :3], sharp) and torch.equal(with_alpha[..., 3], rgba[..., 3])


def _gradient() -> torch.Tensor:
    ramp = torch.linspace(0, 1, 64)
    return torch.stack([ramp.expand(16, 64)] * 3, dim=-1)[None]


def test_quantize_keeps_to_its_palette_and_dithering_keeps_the_local_mean():
    image = _gradient()
    (flat,) = f.image_quantize(CTX, image, 4, "none")
    assert len(torch.unique(flat.reshape(-1, 3), dim=0)) <= 4
    palette = {tuple(c) for c in flat.reshape(-1, 3).tolist()}
    for dither in ("floyd-steinberg", "bayer-4", "bayer-16"):
        (out,) = f.image_quantize(CTX, image, 4, dither)
        assert {tuple(c) for c in out.reshape(-1, 3).tolist()} <= palette, dither
        # averaged over 8-pixel columns, dithering follows the ramp better than flat bands do
        cols = lambda x: x[0, :, :, 0].reshape(16, 8, 8).mean(dim=(0, 2))  # noqa: E731
        assert (cols(out) - cols(image)).abs().mean() < (cols(flat) - cols(image)).abs().mean(), dither
    few = torch.zeros(1, 4, 4, 3)
    few[0, :2] = torch.tensor([0.2, 0.4, 0.6])
    (exact,) = f.image_quantize(CTX, few, 256, "none")
    assert torch.allclose(exact, few, atol=1 / 255)  # fewer colours than the palette: unchanged


def test_bad_inputs_name_the_input():
    for call, name in ((lambda: f.image_quantize(CTX, _dot(), 4, "ordered"), "dither"),
                       (lambda: f.image_blur(CTX, _dot(), 0, 1.0), "blur_radius"),
                       (lambda: f.image_sharpen(CTX, _dot(), 1, 0.0, 1.0), "sigma"),
                       (lambda: f.image_blur(CTX, torch.zeros(4, 4), 1, 1.0), "image")):
        with pytest.raises(NodeError) as err:
            call()
        assert err.value.input_name == name
