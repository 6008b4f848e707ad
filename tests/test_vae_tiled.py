"""Tiled VAE encode/decode and the tiling they share (nodes/tiling.py).

The blending arithmetic is checked exactly with operators whose result does not
depend on the neighbourhood (nearest upsampling, 8x8 average pooling): there, any
tiling must give the untiled result to float precision. The tiny VAE is checked
for exact equality when one tile covers the image, and within a stated tolerance
with several tiles: its GroupNorm statistics and mid-block attention are computed
per tile, so tiles cannot reproduce the whole-image result exactly (as with
ComfyUI's tiled VAE). Measured on the 192x128 landscape, tile 128 / overlap 64:
(overlap capped at 32): mean |difference| 0.061 decoded (0..1 pixels) and 0.074 encoded (latents whose mean
|value| is 0.28); the random-weight tiny VAE is far less local than a trained one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from engine.context import NodeError
from node_call import Called, call
from nodes import loaders, vae, vae_tiled
from nodes.tiling import count_tiles, tile_starts, tiled_apply


@pytest.mark.parametrize("length,tile,overlap", [(10, 4, 1), (64, 64, 8), (65, 64, 8), (200, 64, 32), (7, 16, 4)])
def test_tiles_cover_the_length_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = set()
    for a, b in zip(starts, starts[1:]):
        assert min(a + tile, length) - b >= min(overlap, tile)  # neighbours share at least the overlap
    for s in starts:
        covered |= set(range(s, min(s + tile, length)))
        assert s + min(tile, length) <= length  # every tile lies inside: no padding
    assert covered == set(range(length))


@pytest.mark.parametrize("h,w,tile,overlap", [(37, 53, 16, 4), (32, 32, 8, 2), (20, 9, 64, 8)])
def test_blending_is_exact_for_pointwise_operators(h, w, tile, overlap):
    x = torch.rand(2, 3, h, w)
    up = lambda t: F.interpolate(t, scale_factor=4, mode="nearest")  # noqa: E731
    calls = []
    out = tiled_apply(x, up, tile, overlap, scale=4, progress=lambda d, n: calls.append((d, n)))
    assert torch.allclose(out, up(x), atol=1e-6)
    assert calls[-1] == (count_tiles(h, w, tile, overlap), count_tiles(h, w, tile, overlap))
    pooled = torch.rand(1, 3, 8 * h, 8 * w)
    down = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    assert torch.allclose(tiled_apply(pooled, down, 8 * tile, 8 * overlap, scale=1 / 8), down(pooled), atol=1e-6)


@pytest.fixture()
def sd1_vae(tiny_env):
    _, _, handle = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    return handle


def landscape(w: int, h: int) -> torch.Tensor:
    from nodes.sample_image import draw_landscape

    return torch.from_numpy(np.asarray(draw_landscape(w, h), dtype=np.float32) / 255.0).unsqueeze(0)


def test_one_tile_equals_the_untiled_vae(tiny_env, sd1_vae):
    image = landscape(96, 64)
    (latent,) = call(vae.vae_encode, tiny_env, pixels=image, vae=sd1_vae)
    (tiled_latent,) = call(vae_tiled.vae_encode_tiled, tiny_env, pixels=image, vae=sd1_vae, tile_size=128,
                           overlap=32)
    assert torch.equal(tiled_latent["samples"], latent["samples"])
    (decoded,) = call(vae.vae_decode, tiny_env, samples=latent, vae=sd1_vae)
    (tiled,) = call(vae_tiled.vae_decode_tiled, tiny_env, samples=latent, vae=sd1_vae, tile_size=128, overlap=32)
    assert torch.equal(tiled, decoded)


def test_several_tiles_stay_within_the_stated_tolerance(tiny_env, sd1_vae):
    image = landscape(192, 128)
    (latent,) = call(vae.vae_encode, tiny_env, pixels=image, vae=sd1_vae)
    (decoded,) = call(vae.vae_decode, tiny_env, samples=latent, vae=sd1_vae)
    errors = {}
    for tile in (64, 128):
        rec = Called()
        (tiled,) = call(vae_tiled.vae_decode_tiled, tiny_env, rec, samples=latent, vae=sd1_vae, tile_size=tile,
                        overlap=tile // 2)
        assert tiled.shape == decoded.shape and len(rec.progress) == count_tiles(16, 24, tile // 8, tile // 32)
        assert float(tiled.min()) >= 0.0 and float(tiled.max()) <= 1.0
        errors[tile] = float((tiled - decoded).abs().mean())
    assert errors[128] < 0.08 and errors[128] < errors[64]
    (tiled_latent,) = call(vae_tiled.vae_encode_tiled, tiny_env, pixels=image, vae=sd1_vae, tile_size=128,
                           overlap=64)
    assert tiled_latent["samples"].shape == latent["samples"].shape
    assert float((tiled_latent["samples"] - latent["samples"]).abs().mean()) < 0.1


def test_tiled_encode_follows_vae_encodes_size_rule_and_errors(tiny_env, sd1_vae):
    rec = Called()
    (latent,) = call(vae_tiled.vae_encode_tiled, tiny_env, rec, pixels=landscape(100, 60), vae=sd1_vae,
                     tile_size=64, overlap=16)
    assert latent["samples"].shape == (1, 4, 8, 13) and "resized 100x60 to 104x64" in rec.messages[0]
    with pytest.raises(NodeError, match="multiples of 8") as err:
        call(vae_tiled.vae_encode_tiled, tiny_env, pixels=landscape(100, 60), vae=sd1_vae, tile_size=64,
             overlap=16, size_rule="reject")
    assert err.value.input_name == "pixels"
    rec = Called()
    call(vae_tiled.vae_decode_tiled, tiny_env, rec, samples=latent, vae=sd1_vae, tile_size=64, overlap=64)
    assert "using 16" in rec.messages[0]  # the overlap is capped at a quarter of the tile, as in ComfyUI
    with pytest.raises(NodeError, match="channels") as err:
        call(vae_tiled.vae_decode_tiled, tiny_env, samples={"samples": torch.zeros(1, 16, 8, 8)}, vae=sd1_vae)
    assert err.value.input_name == "samples"
