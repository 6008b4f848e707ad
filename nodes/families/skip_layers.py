"""Skip-layer guidance (ComfyUI's SkipLayerGuidanceDiT and SkipLayerGuidanceDiTSimple): guide a
transformer away from its own prediction with some of its blocks skipped.

A skipped block passes its inputs through (ComfyUI replaces it with ``return args``). The
full node evaluates the conditional side once more with the blocks skipped, inside a window
of noise levels, and moves the guided clean prediction by ``scale * (cond - skipped)``,
optionally rescaled towards the conditional prediction's spread; it runs at cfg 1 too, as
ComfyUI's post-CFG hooks do. The simple node instead evaluates the *unconditional* side with
the blocks skipped, so plain CFG guides away from that. Which blocks a family has is the
family's (:meth:`~nodes.families.base.Family.dit_blocks`): FLUX's double and single blocks.

Blocks are called in many ways (FLUX's by keyword, Krea 2's, Wan's or Kandinsky 5's by position)
and return either their one stream or a pair of streams, in an order of their own (FLUX's text
first, JoyImage's picture first): a skipped block binds its call to its own
``forward`` signature and hands on what it was given in the shape it would have returned,
the pair's order named by the family (``returns``: :attr:`~nodes.families.base.Family.dit_block_returns`).
"""
from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Iterator

from nodes.families.base import ConditioningError, Family
from nodes.runtime.compiled import while_hooked


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


#: What a block returning a pair returns, by input name: diffusers' FLUX convention (the families' default).
TEXT_FIRST = Family.dit_block_returns


def handed_on(module: Any, args: tuple, kwargs: dict, output: Any,
              returns: tuple[str, ...] = TEXT_FIRST) -> Any:
    """What a skipped block returns: its inputs, in the form of ``output`` (one stream: the block's
    first input; a tuple: the inputs ``returns`` names, in that order)."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    if not isinstance(output, (tuple, list)):
        return args[0] if args else next(iter(given.values()))
    if len(output) != len(returns) or any(name not in given for name in returns):
        raise ConditioningError(f"skip-layer guidance cannot pass {type(module).__name__}'s inputs on: it returns "
                                f"{len(output)} values and takes {', '.join(given)}", "model")
    return tuple(given[name] for name in returns)


@contextlib.contextmanager
def skipping(blocks: dict[str, list], layers: tuple[tuple[str, tuple[int, ...]], ...],
             returns: tuple[str, ...] = TEXT_FIRST) -> Iterator[None]:
    """While the block runs, the listed blocks hand their inputs on (their output replaced by a hook,
    :func:`handed_on`; ``returns``: the input names a pair-returning block's outputs stand for)."""
    def passthrough(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        return handed_on(module, args, kwargs, output, returns)

    hooks = [blocks[kind][i].register_forward_hook(passthrough, with_kwargs=True)
             for kind, numbers in layers for i in numbers]
    with while_hooked(hooks):
        yield


def rescaled(guided: Any, cond: Any, factor: float) -> Any:
    """ComfyUI's rescaling: ``guided`` scaled by factor * std(cond) / std(guided) + (1 - factor)."""
    return guided * (factor * (cond.std() / guided.std()) + (1.0 - factor))
