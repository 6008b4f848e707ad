"""Token merging for Stable Diffusion (ComfyUI's TomePatchModel, after dbolya/tomesd): the UNet's
self-attention at the latent's full size attends with fewer queries, the most redundant ones
merged into their nearest neighbours, and the result is copied back to every merged position.

ComfyUI's rule (comfy_extras/nodes_tomesd.py), followed here:

* it applies to a self-attention whose token count N gives ceil(sqrt((H * W) // N)) <= 1 for
  the H x W latent the UNet was given: SD1/SD2's first level (SDXL has no attention there);
* the latent grid is cut into 2 x 2 cells; in each whole cell one position, drawn at random,
  is a destination, every other position (and the rows and columns left over at odd sizes)
  a source. Destinations come first, in the order a (non-stable) argsort of the marks gives;
* r = int(N * ratio) (at most the number of sources) sources are merged: each source's best
  cosine similarity to any destination (over the attention's normalised input) ranks them,
  the r best are averaged into their destination (the destination's own value included);
* only the queries are merged; the keys and values are the full sequence. The output of the
  N - r queries is spread back: unmerged sources and destinations to their own places, each
  merged source takes its destination's output.

Ratio 0 (r = 0) leaves the attention as it was. The random cells come from ComfyUI's global
torch generator (seeded with KSampler's seed before the noise is drawn); Kiln draws them from
a per-run generator in that same state (nodes.families.hypertile.start_generator).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from nodes.families.perturbed import SelfAttentionProcessor


@dataclass(frozen=True)
class TomeSettings:
    ratio: float


@dataclass
class Merging:
    """Which token goes where: ``order`` (destinations first, then sources), and among the
    sources the ``kept`` and ``merged`` ones with the destination each merged one joins."""

    order: Any
    destinations: int
    kept: Any
    merged: Any
    target: Any

    def _sides(self, x: Any) -> tuple[Any, Any]:
        import torch

        b, _, c = x.shape
        dst = torch.gather(x, 1, self.order[:, :self.destinations].expand(b, -1, c))
        src = torch.gather(x, 1, self.order[:, self.destinations:].expand(b, -1, c))
        return src, dst

    def merge(self, x: Any) -> Any:
        """``x`` [B, N, C] -> [B, N - r, C]: the kept sources, then the destinations with their merged
        sources averaged in."""
        import torch

        src, dst = self._sides(x)
        c = x.shape[-1]
        kept = torch.gather(src, 1, self.kept.expand(-1, -1, c))
        moving = torch.gather(src, 1, self.merged.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, self.target.expand(-1, -1, c), moving, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: Any) -> Any:
        """[B, N - r, C] -> [B, N, C]: each position gets its own row, a merged one its destination's."""
        import torch

        b, _, c = y.shape
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]
        sources = self.order[:, self.destinations:]
        out = torch.zeros(b, self.order.shape[1], c, dtype=y.dtype, device=y.device)
        out.scatter_(1, self.order[:, :self.destinations].expand(b, -1, c), dst)
        out.scatter_(1, torch.gather(sources.expand(b, -1, 1), 1, self.kept).expand(-1, -1, c), kept)
        merged_rows = torch.gather(dst, 1, self.target.expand(-1, -1, c))
        out.scatter_(1, torch.gather(sources.expand(b, -1, 1), 1, self.merged).expand(-1, -1, c), merged_rows)
        return out


def matching(metric: Any, w: int, h: int, r: int, generator: Any) -> Merging | None:
    """ComfyUI's random 2 x 2 bipartite matching of ``metric`` [B, N, C] (N = h * w); None when
    nothing merges (r <= 0, or a grid one token wide or high)."""
    import torch

    b, n, _ = metric.shape
    if r <= 0 or w == 1 or h == 1:
        return None
    with torch.no_grad():
        rows, cols = h // 2, w // 2
        pick = torch.randint(4, (rows, cols, 1), generator=generator).to(metric.device)
        marks = torch.zeros(rows, cols, 4, dtype=torch.int64, device=metric.device)
        marks.scatter_(2, pick, -torch.ones_like(pick))
        marks = marks.view(rows, cols, 2, 2).transpose(1, 2).reshape(rows * 2, cols * 2)
        if rows * 2 < h or cols * 2 < w:
            grid = torch.zeros(h, w, dtype=torch.int64, device=metric.device)
            grid[:rows * 2, :cols * 2] = marks
            marks = grid
        order = marks.reshape(1, -1, 1).argsort(dim=1)
        destinations = rows * cols
        unit = metric / metric.norm(dim=-1, keepdim=True)
        sides = Merging(order, destinations, None, None, None)
        src, dst = sides._sides(unit)
        similarity = src @ dst.transpose(-1, -2)
        r = min(src.shape[1], r)
        best, nearest = similarity.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        merged = ranked[:, :r]
        return Merging(order, destinations, ranked[:, r:], merged, torch.gather(nearest[..., None], 1, merged))


class MergedSelfAttention(SelfAttentionProcessor):
    """A UNet self-attention with merged queries where ToMe applies; the original elsewhere."""

    def __init__(self, original: Any, run: "TomeRun") -> None:
        self.original, self.run = original, run
        self.merging: Merging | None = None

    def __call__(self, attn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        self.merging = None
        if hidden_states.ndim == 3 and kwargs.get("encoder_hidden_states") is None and not args \
                and getattr(attn, "norm_q", None) is None:
            self.merging = self.run.merging(hidden_states)
        if self.merging is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        return super().__call__(attn, hidden_states, *args, **kwargs)

    def attend(self, attn: Any, tokens: Any) -> Any:
        return self.merging.unmerge(merged_attention(tokens, self.merging.merge, attn.to_q, attn.to_k, attn.to_v,
                                                     attn.heads))


def merged_attention(tokens: Any, merge: Callable[[Any], Any], to_q: Any, to_k: Any, to_v: Any, heads: int) -> Any:
    """softmax(Q K^T / sqrt(d)) V per head, with Q from the merged tokens, K and V from all of them."""
    import torch

    q, k, v = to_q(merge(tokens)), to_k(tokens), to_v(tokens)
    b, m, c = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, m, c)


class TomeRun:
    """One run's state: the UNet's latent size (set by a hook at each call) and the generator."""

    def __init__(self, settings: TomeSettings, generator: Any) -> None:
        self.settings, self.generator = settings, generator
        self.size: tuple[int, int] = (0, 0)

    def merging(self, tokens: Any) -> Merging | None:
        rows, cols = self.size
        n = tokens.shape[1]
        if math.ceil(math.sqrt((rows * cols) // n)) > 1:
            return None
        return matching(tokens, cols, rows, int(n * self.settings.ratio), self.generator)


@contextlib.contextmanager
def applied(network: Any, settings: TomeSettings | None, generator: Any = None) -> Iterator[None]:
    """``network`` (a diffusers UNet) with ToMe's self-attention while the block runs; nothing
    when ``settings`` is None."""
    if settings is None:
        yield
        return
    from nodes.families.hypertile import self_attention_replaced

    with self_attention_replaced(network, TomeRun(settings, generator), MergedSelfAttention):
        yield
