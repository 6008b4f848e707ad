"""HyperTile (ComfyUI's node, after tfernd/HyperTile): the UNet's self-attention at its largest
feature sizes computed in tiles, so its cost grows with the tile instead of the whole image.

ComfyUI's rule, followed exactly (comfy_extras/nodes_hypertile.py):

* a self-attention ("attn1") is tiled when its token count equals (H / 2^i) * (W / 2^i) for
  some depth i in 0..``max_depth``, H x W being the latent the UNet was given. SD1/SD2 attend
  at the latent's size (depth 0); SDXL's first level has no attention, so at the default
  max_depth 0 HyperTile leaves SDXL as it is;
* with aspect = W / H the token grid is read as h = round(sqrt(n * aspect)) by
  w = round(sqrt(n / aspect)) (for a square latent its rows and columns; otherwise ComfyUI
  swaps them, which this keeps);
* the tile counts are nh = random_divisor(h, tile, swap_size), nw likewise, tile being
  max(32, tile_size) // 8 latent pixels (times 2^i with ``scale_depth``): among the divisors
  d >= tile of h (the first ``swap_size`` of them, smallest first) one is picked and h / d
  is the count. The pick is ``randint(0, options - 1)``, whose upper end is exclusive, so the
  last option is never taken (at swap_size 2, the default, the first always is);
* only the queries are tiled, into (nh, nw) blocks of the grid; the keys and values keep
  their layout, so the attention's reshape to the queries' batch splits them into nh * nw
  runs of consecutive tokens: tile j (row-major over the tiles) attends to the j-th run.
  With nh * nw = 1 the attention is the UNet's own.

The random picks come from the process-wide torch generator in ComfyUI, which its noise
preparation seeds with KSampler's seed (torch.manual_seed) before drawing the whole batch's
noise. Kiln draws them from a generator of its own per run, seeded with the first image's
seed and advanced past a draw of the batch's noise shape, so two runs pick alike.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

from nodes.families.perturbed import SelfAttentionProcessor
from nodes.runtime.compiled import eager_while_hooked


@dataclass(frozen=True)
class HyperTileSettings:
    tile_size: int
    swap_size: int
    max_depth: int
    scale_depth: bool


def random_divisor(value: int, least: int, options: int, generator: Any) -> int:
    """How many tiles of at least ``least`` to cut ``value`` into (ComfyUI's pick, see above)."""
    import torch

    least = min(least, value)
    counts = [value // d for d in range(least, value + 1) if value % d == 0][:options]
    if len(counts) > 1:
        return counts[int(torch.randint(0, len(counts) - 1, (1,), generator=generator).item())]
    return counts[0]


class TiledSelfAttention(SelfAttentionProcessor):
    """A UNet self-attention that tiles its queries where HyperTile applies, else the original."""

    def __init__(self, original: Any, run: "HyperTileRun") -> None:
        self.original, self.run = original, run
        self.tiles: tuple[int, int, int, int] | None = None

    def __call__(self, attn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if hidden_states.ndim == 3 and kwargs.get("encoder_hidden_states") is None and not args:
            self.tiles = self.run.tiles(hidden_states.shape[1])
        else:
            self.tiles = None
        if self.tiles is None or getattr(attn, "norm_q", None) is not None:
            return self.original(attn, hidden_states, *args, **kwargs)
        return super().__call__(attn, hidden_states, *args, **kwargs)

    def attend(self, attn: Any, tokens: Any) -> Any:
        return tiled_attention(tokens, attn.to_q, attn.to_k, attn.to_v, attn.heads, *self.tiles)


def tiled_attention(tokens: Any, to_q: Any, to_k: Any, to_v: Any, heads: int, nh: int, nw: int, h: int,
                    w: int) -> Any:
    """Self-attention over ``tokens`` [B, h * w, C] with the queries tiled (nh, nw) and each tile
    attending to its run of consecutive keys and values (see the module's docstring); the
    result [B, h * w, C] before the output projection."""
    import torch

    b, n, _ = tokens.shape
    q, k, v = to_q(tokens), to_k(tokens), to_v(tokens)
    c = q.shape[-1]
    th, tw = h // nh, w // nw
    q = q.reshape(b, nh, th, nw, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, th * tw, c)
    k, v = k.reshape(b * nh * nw, -1, c), v.reshape(b * nh * nw, -1, c)
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * nh * nw, -1, c)
    return out.reshape(b, nh, nw, th, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)


class HyperTileRun:
    """One run's state: the UNet's latent size (set by a hook at each call) and the generator."""

    def __init__(self, settings: HyperTileSettings, generator: Any) -> None:
        self.settings, self.generator = settings, generator
        self.size: tuple[int, int] = (0, 0)

    def tiles(self, tokens: int) -> tuple[int, int, int, int] | None:
        """(nh, nw, h, w) for a self-attention over ``tokens`` positions; None: not tiled."""
        rows, cols = self.size
        sizes = [(rows / 2 ** i) * (cols / 2 ** i) for i in range(self.settings.max_depth + 1)]
        if tokens not in sizes:
            return None
        aspect = cols / rows
        h, w = round(math.sqrt(tokens * aspect)), round(math.sqrt(tokens / aspect))
        least = max(32, self.settings.tile_size) // 8 * (2 ** sizes.index(tokens) if self.settings.scale_depth else 1)
        nh = random_divisor(h, least, self.settings.swap_size, self.generator)
        nw = random_divisor(w, least, self.settings.swap_size, self.generator)
        return (nh, nw, h, w) if nh * nw > 1 else None


def self_attentions(unet: Any) -> list[Any]:
    return [m for name, m in unet.named_modules() if name.endswith("attn1") and hasattr(m, "processor")]


def start_generator(seed: int, noise_shape: tuple[int, ...]) -> Any:
    """A generator in the state ComfyUI's global one has when sampling starts (see the docstring)."""
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    torch.randn(noise_shape, generator=generator)
    return generator


@contextlib.contextmanager
def applied(network: Any, settings: HyperTileSettings | None, generator: Any = None) -> Iterator[None]:
    """``network`` (a diffusers UNet) with HyperTile's self-attention while the block runs;
    nothing when ``settings`` is None."""
    if settings is None:
        yield
        return
    with self_attention_replaced(network, HyperTileRun(settings, generator), TiledSelfAttention):
        yield


@contextlib.contextmanager
def self_attention_replaced(network: Any, run: Any, make: Any) -> Iterator[None]:
    """Every self-attention of ``network``'s UNet given the processor ``make(original, run)``, and
    ``run.size`` set to the latent's (rows, columns) at each UNet call, while the block runs."""
    import torch

    from nodes.families.unet_network import unet_of

    unet = unet_of(network, "HyperTile")
    if run.generator is None:
        run.generator = torch.Generator().manual_seed(0)

    def latent_size(module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        run.size = (int(sample.shape[-2]), int(sample.shape[-1]))

    modules = self_attentions(unet)
    saved = [m.processor for m in modules]
    for m, processor in zip(modules, saved):
        m.processor = make(processor, run)
    hook = unet.register_forward_pre_hook(latent_size, with_kwargs=True)
    try:
        with eager_while_hooked():
            yield
    finally:
        hook.remove()
        for m, processor in zip(modules, saved):
            m.processor = processor
