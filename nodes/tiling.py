"""Run a function over overlapping tiles and blend the pieces so no seam shows.

VAEEncodeTiled, VAEDecodeTiled and ImageUpscaleWithModel all need the same thing:
apply ``fn`` (a VAE, an upscale network) to a tensor too large to pass whole, where
``fn`` changes the spatial size by a fixed ``scale`` (8 for a VAE decoder, 1/8 for
its encoder, 4 for a 4x upscaler). The rule, in one place:

* Tiles are ``tile`` wide with at least ``overlap`` shared with the neighbour; the
  last tile of a row is moved back to end at the border, so every tile is full size
  and the image needs no padding.
* Each tile's output is weighted by a linear ramp across the part it shares with a
  neighbour (rising from the tile's edge inwards), and the weighted pieces are
  summed and divided by the summed weights. Borders of the image get no ramp, so an
  image that fits in one tile gives exactly ``fn(x)``.
* With a ``scale`` below 1 (an encoder), tile positions snap to multiples of
  1/scale pixels so each tile maps onto whole output cells.
"""
from __future__ import annotations

from typing import Any, Callable


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, ramp: int, rise: bool, fall: bool) -> Any:
    import torch

    w = torch.ones(size)
    n = min(ramp, size)
    if n > 0:
        steps = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
        if rise:
            w[:n] = torch.minimum(w[:n], steps)
        if fall:
            w[size - n:] = torch.minimum(w[size - n:], steps.flip(0))
    return w


def count_tiles(height: int, width: int, tile: int, overlap: int, scale: float = 1.0) -> int:
    unit = _unit(scale)
    return (len(tile_starts(height // unit, tile // unit, overlap // unit))
            * len(tile_starts(width // unit, tile // unit, overlap // unit)))


def _unit(scale: float) -> int:
    return max(1, round(1.0 / scale)) if scale < 1 else 1


def tiled_apply(x: Any, fn: Callable[[Any], Any], tile: int, overlap: int, scale: float,
                progress: Callable[[int, int], None] | None = None) -> Any:
    """``fn`` applied to ``x`` [B, C, H, W] tile by tile and blended; float32 on the CPU.

    ``tile`` and ``overlap`` are in input pixels; ``fn`` must map a [B, C, h, w]
    tile to [B, C', round(h * scale), round(w * scale)].
    """
    import torch

    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    unit = _unit(scale)
    _, _, h, w = x.shape
    ys = [s * unit for s in tile_starts(h // unit, tile // unit, overlap // unit)]
    xs = [s * unit for s in tile_starts(w // unit, tile // unit, overlap // unit)]
    th, tw = min(tile, h), min(tile, w)
    ramp = max(1, round(overlap * scale))
    out = weights = None
    total, done = len(ys) * len(xs), 0
    for y in ys:
        for x0 in xs:
            piece = fn(x[:, :, y:y + th, x0:x0 + tw]).to("cpu", torch.float32)
            if out is None:
                out = torch.zeros((x.shape[0], piece.shape[1], round(h * scale), round(w * scale)))
                weights = torch.zeros((1, 1, out.shape[2], out.shape[3]))
            oy, ox = round(y * scale), round(x0 * scale)
            ph, pw = piece.shape[2], piece.shape[3]
            wy = _ramp(ph, ramp, rise=y > 0, fall=y + th < h)
            wx = _ramp(pw, ramp, rise=x0 > 0, fall=x0 + tw < w)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, oy:oy + ph, ox:ox + pw] += piece * mask
            weights[:, :, oy:oy + ph, ox:ox + pw] += mask
            done += 1
            if progress is not None:
                progress(done, total)
    return out / weights
