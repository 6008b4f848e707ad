"""VAEEncodeTiled and VAEDecodeTiled: the VAE over overlapping tiles, so large images fit in memory.

The VAE itself and its size rule are VAEEncode's and VAEDecode's (``nodes/vae.py``);
the tiling and the seam blending are ``nodes/tiling.py``'s. An image that fits in one
tile gives exactly the untiled result; with several tiles the VAE's mid-block
attention sees only its tile, so the result differs from the untiled one by a small
amount near the seams (measured on the tiny test model in tests/test_vae_tiled.py).

``temporal_size`` and ``temporal_overlap`` are accepted so ComfyUI workflows validate
unchanged; they only concern video VAEs, which Kiln does not have, and are ignored.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, Result, define_node
from nodes.vae import SIZE_RULES


def _temporal_inputs() -> list[Input]:
    return [Input("temporal_size", T.INT, default=64, min=8, max=4096, step=4, optional=True,
                  tooltip="Video VAEs only; ignored here"),
            Input("temporal_overlap", T.INT, default=8, min=4, max=4096, step=4, optional=True,
                  tooltip="Video VAEs only; ignored here")]


def _overlap(tile_size: int, overlap: int, ctx) -> int:
    """ComfyUI's rule: the overlap is at most a quarter of the tile."""
    if tile_size < overlap * 4:
        ctx.message(f"overlap {overlap} is more than a quarter of the {tile_size} px tile: using {tile_size // 4}")
        return tile_size // 4
    return overlap


@define_node(
    "VAEDecodeTiled",
    category="latent",
    display_name="VAE Decode (Tiled)",
    inputs=[Input("samples", T.LATENT), Input("vae", T.VAE),
            Input("tile_size", T.INT, default=512, min=64, max=4096, step=32, tooltip="Tile side in pixels"),
            Input("overlap", T.INT, default=64, min=0, max=4096, step=32,
                  tooltip="Pixels shared by neighbouring tiles, blended so no seam shows"),
            *_temporal_inputs()],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def vae_decode_tiled(ctx, samples, vae, tile_size: int = 512, overlap: int = 64, temporal_size: int = 64,
                     temporal_overlap: int = 8):
    """Decode latents to an IMAGE tile by tile: memory grows with the tile, not the image."""
    import torch

    from nodes.tiling import tiled_apply
    from nodes.vae import _check_vae

    vae = _check_vae(vae)
    latent = samples.get("samples") if isinstance(samples, dict) else None
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        raise NodeError("samples must be a LATENT ({'samples': tensor [batch, channels, h, w]})", "samples")
    if latent.shape[1] != vae.latent_channels:
        raise NodeError(f"the latent has {latent.shape[1]} channels but this VAE expects {vae.latent_channels}",
                        "samples")
    cell = vae.downscale
    overlap = _overlap(int(tile_size), int(overlap), ctx)
    tile_cells, overlap_cells = max(1, int(tile_size) // cell), int(overlap) // cell
    image = tiled_apply(latent.float(), lambda t: vae.decode(t).movedim(-1, 1), tile_cells, overlap_cells,
                        scale=cell, progress=ctx.progress)
    return (image.clamp(0.0, 1.0).movedim(1, -1).contiguous(),)


@define_node(
    "VAEEncodeTiled",
    category="latent",
    display_name="VAE Encode (Tiled)",
    inputs=[Input("pixels", T.IMAGE), Input("vae", T.VAE),
            Input("tile_size", T.INT, default=512, min=64, max=4096, step=64, tooltip="Tile side in pixels"),
            Input("overlap", T.INT, default=64, min=0, max=4096, step=32,
                  tooltip="Pixels shared by neighbouring tiles, blended so no seam shows"),
            *_temporal_inputs(),
            Input("size_rule", T.COMBO, default="resize", choices=SIZE_RULES, optional=True,
                  tooltip="Sides that are not multiples of 8: as VAEEncode's size_rule")],
    outputs=[Output("LATENT", T.LATENT)],
)
def vae_encode_tiled(ctx, pixels, vae, tile_size: int = 512, overlap: int = 64, temporal_size: int = 64,
                     temporal_overlap: int = 8, size_rule: str = "resize"):
    """Encode an image tile by tile to latents (the posterior mean, unscaled, as VAEEncode)."""
    from nodes.masking import as_image
    from nodes.tiling import tiled_apply
    from nodes.vae import MIN_SIDE, _check_vae, fit_to_multiple

    vae = _check_vae(vae)
    if size_rule not in SIZE_RULES:
        raise NodeError(f"size_rule must be one of {', '.join(SIZE_RULES)}", "size_rule")
    pixels = as_image(pixels, "pixels")
    b, h, w, c = pixels.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise NodeError(f"the image is {w}x{h}; VAEEncodeTiled needs at least {MIN_SIDE}x{MIN_SIDE} pixels",
                        "pixels")
    if c == 1:
        pixels = pixels.expand(b, h, w, 3)
    pixels, done = fit_to_multiple(pixels.float(), vae.downscale, size_rule)
    cell = vae.downscale
    overlap = _overlap(int(tile_size), int(overlap), ctx)
    tile = max(cell, int(tile_size) // cell * cell)
    latent = tiled_apply(pixels[..., :3].movedim(-1, 1), lambda t: vae.encode(t.movedim(1, -1).contiguous()),
                         tile, int(overlap) // cell * cell, scale=1.0 / cell, progress=ctx.progress)
    if done:
        ctx.message(done)
        return Result(outputs=({"samples": latent},), ui={"text": [done]})
    return ({"samples": latent},)
