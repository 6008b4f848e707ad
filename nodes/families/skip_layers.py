"""Skip-layer guidance (ComfyUI's SkipLayerGuidanceDiT and SkipLayerGuidanceDiTSimple): guide a
transformer away from its own prediction with some of its blocks skipped.

A skipped block passes its inputs through (ComfyUI replaces it with ``return args``). The
full node evaluates the conditional side once more with the blocks skipped, inside a window
of noise levels, and moves the guided clean prediction by ``scale * (cond - skipped)``,
optionally rescaled towards the conditional prediction's spread; it runs at cfg 1 too, as
ComfyUI's post-CFG hooks do. The simple node instead evaluates the *unconditional* side with
the blocks skipped, so plain CFG guides away from that. Which blocks a family has is the
family's (:meth:`~nodes.families.base.Family.dit_blocks`): FLUX's double and single blocks.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

from nodes.runtime.compiled import eager_while_hooked


@dataclass(frozen=True)
class SkipLayers:
    """The blocks to skip (by kind: "double", "single"), the window in ComfyUI's percents, and
    (for the full node) the scale and rescaling; ``simple``: skip them in the unconditional pass."""

    layers: tuple[tuple[str, tuple[int, ...]], ...]
    start_percent: float
    end_percent: float
    scale: float = 0.0
    rescaling_scale: float = 0.0
    simple: bool = False


def parse(text: str) -> tuple[int, ...]:
    """Block numbers from ComfyUI's text input ("7, 8, 9": every run of digits, in order)."""
    return tuple(int(n) for n in re.findall(r"\d+", str(text)))


@contextlib.contextmanager
def skipping(blocks: dict[str, list], layers: tuple[tuple[str, tuple[int, ...]], ...]) -> Iterator[None]:
    """While the block runs, the listed blocks hand their inputs on (their output replaced by a hook)."""
    def passthrough(module: Any, args: tuple, kwargs: dict, output: Any) -> tuple:
        return kwargs["encoder_hidden_states"], kwargs["hidden_states"]

    hooks = [blocks[kind][i].register_forward_hook(passthrough, with_kwargs=True)
             for kind, numbers in layers for i in numbers]
    try:
        with eager_while_hooked():
            yield
    finally:
        for hook in hooks:
            hook.remove()


def rescaled(guided: Any, cond: Any, factor: float) -> Any:
    """ComfyUI's rescaling: ``guided`` scaled by factor * std(cond) / std(guided) + (1 - factor)."""
    return guided * (factor * (cond.std() / guided.std()) + (1.0 - factor))
