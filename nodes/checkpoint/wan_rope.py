"""Wan's 3-D rotary positions as ComfyUI computes them, with ScaleROPE's scale and shift per axis.

diffusers' ChronoEditTransformer3DModel builds its rotary table for integer positions and, for a
two-frame latent, gives the frames positions 0 and 7 (its ``temporal_skip_len``: ChronoEdit's edit
pair). ComfyUI loads the same file as a Wan 2.1 image-to-video model whose frames sit at 0, 1, ...;
its ChronoEdit template adds ScaleROPE (scale_t 7), whose positions along an axis of n patches are
``linspace(shift, shift + (n - 1) * scale, n)`` (comfy/ldm/wan/model.py ``rope_encode``), so 0 and 7
again. Kiln follows ComfyUI: :class:`WanRope` replaces the model's table (the loader installs it) and
reads :attr:`WanRope.options` (ScaleROPE's six numbers, None: plain positions). Each axis of a head
(t, h, w: ``d - 4 * (d // 6)``, ``2 * (d // 6)``, ``2 * (d // 6)`` wide) turns by
``position / 10000 ** (2i / width)``; the result is diffusers' (cos, sin) pair, each value repeated
for the two halves of a rotated pair, [1, tokens, 1, head width].
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

THETA = 10000.0
#: ScaleROPE's inputs in ComfyUI's order.
OPTION_NAMES = ("scale_x", "shift_x", "scale_y", "shift_y", "scale_t", "shift_t")


def axis_widths(head_dim: int) -> tuple[int, int, int]:
    """The (t, h, w) widths of a head's rotary axes (Wan's split)."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def positions(n: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """ComfyUI's positions of ``n`` patches along one axis (float64)."""
    return torch.linspace(shift, shift + (n - 1) * scale, n, dtype=torch.float64)


def _angles(pos: torch.Tensor, width: int) -> torch.Tensor:
    inv = 1.0 / THETA ** (torch.arange(0, width, 2, dtype=torch.float64) / width)
    return torch.outer(pos, inv).repeat_interleave(2, dim=1)


class WanRope(torch.nn.Module):
    """The transformer's ``rope``: (cos, sin) for a [B, C, frames, h, w] input (see the module docstring).
    Integer positions in range are read from the class's own table (``freqs_cos``/``freqs_sin``: every
    axis's angles at 0, 1, ... in float64, stored float32, kept from the module it replaces); others,
    ScaleROPE's fractional or shifted ones, are computed by the same rule."""

    def __init__(self, head_dim: int, patch_size: tuple[int, int, int], table: Any = None) -> None:
        super().__init__()
        self.head_dim, self.patch_size = int(head_dim), tuple(int(p) for p in patch_size)
        cos, sin = (None, None) if table is None else (table.freqs_cos, table.freqs_sin)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        #: ScaleROPE's {name: value} while a patched model samples (nodes.wan_nodes.scale_rope); None: plain.
        self.options: dict[str, float] | None = None

    def _axis(self, pos: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        widths = axis_widths(self.head_dim)
        lo = sum(widths[:axis])
        table = self.freqs_cos
        if table is not None and table.shape[-1] == self.head_dim and bool((pos == pos.round()).all()) \
                and float(pos.min()) >= 0 and float(pos.max()) < table.shape[0]:
            rows = pos.long().to(table.device)
            return table[rows, lo:lo + widths[axis]], self.freqs_sin[rows, lo:lo + widths[axis]]
        angles = _angles(pos, widths[axis])
        return angles.cos().float(), angles.sin().float()

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        t, h, w = counts = (frames // p_t, height // p_h, width // p_w)
        o = self.options or {}
        parts = [self._axis(positions(n, float(o.get(f"scale_{a}", 1.0)), float(o.get(f"shift_{a}", 0.0))), i)
                 for i, (n, a) in enumerate(zip(counts, "tyx"))]
        device = hidden_states.device

        def grid(k: int) -> torch.Tensor:
            ft, fh, fw = (part[k].to(device) for part in parts)
            return torch.cat([ft.view(t, 1, 1, -1).expand(t, h, w, -1), fh.view(1, h, 1, -1).expand(t, h, w, -1),
                              fw.view(1, 1, w, -1).expand(t, h, w, -1)], dim=-1).reshape(1, t * h * w, 1, -1)

        return grid(0), grid(1)


def install(model: Any) -> Any:
    """``model`` (a ChronoEditTransformer3DModel) with :class:`WanRope` in place of its table (whose
    integer-position rows it keeps); installing again keeps the first WanRope."""
    if not isinstance(model.rope, WanRope):
        config = model.config
        model.rope = WanRope(int(config.attention_head_dim), tuple(config.patch_size), model.rope)
    return model


@contextlib.contextmanager
def applied(network: Any, options: Mapping[str, float] | tuple | None) -> Iterator[None]:
    """``network``'s rotary positions scaled and shifted by ScaleROPE's ``options`` while sampling runs
    (None: as they are); the table's own options come back after."""
    rope = rope_of(network) if options is not None else None
    if rope is None:
        yield
        return
    before, rope.options = rope.options, dict(options)
    try:
        yield
    finally:
        rope.options = before


def rope_of(network: Any) -> WanRope | None:
    """The WanRope of a network (or a wrapper's ``kiln_network``), None when it has none."""
    rope = getattr(getattr(network, "kiln_network", network), "rope", None)
    return rope if isinstance(rope, WanRope) else None
