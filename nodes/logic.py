"""ComfyUI's logic nodes: ComfySwitchNode ("Switch"), which routes one of two inputs on.

The inputs are lazy (engine.node.Input.lazy): the executor produces only the branch the
switch picks, so the other branch's nodes do not run (an upscale stage turned off costs
nothing). Both sides take any type, as ComfyUI's matched-type sockets do.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

BRANCHES = ("on_false", "on_true")


def _branch(values: Mapping[str, Any], present: Iterable[str]) -> str | None:
    """The input the switch passes on: the one it picks, or the other when that one is not linked."""
    chosen = BRANCHES[bool(values.get("switch"))]
    other = BRANCHES[not bool(values.get("switch"))]
    present = set(present)
    return chosen if chosen in present else other if other in present else None


def _needs(values: Mapping[str, Any], pending: frozenset[str]) -> list[str]:
    linked = pending | {name for name in BRANCHES if values.get(name) is not None}
    picked = _branch(values, linked)
    return [picked] if picked in pending else []


@define_node(
    "ComfySwitchNode",
    category="logic",
    display_name="Switch",
    inputs=[Input("switch", T.BOOLEAN, default=False),
            Input("on_false", T.ANY, optional=True, lazy=True),
            Input("on_true", T.ANY, optional=True, lazy=True)],
    outputs=[Output("output", T.ANY)],
    lazy=_needs,
)
def comfy_switch(ctx, switch: bool, on_false: Any = None, on_true: Any = None):
    """Pass ``on_true`` on when the switch is on, else ``on_false`` (the other one when only one is
    linked); only that branch runs."""
    values = {"switch": switch, "on_false": on_false, "on_true": on_true}
    picked = _branch(values, [name for name in BRANCHES if values[name] is not None])
    if picked is None:
        raise NodeError("link on_false or on_true: there is nothing to pass on", "on_true" if switch else "on_false")
    return (values[picked],)
