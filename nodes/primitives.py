"""ComfyUI's primitive and string nodes: a typed value as a node's output.

ComfyUI's newer editor saves ``PrimitiveInt``, ``PrimitiveFloat``,
``PrimitiveString``, ``PrimitiveStringMultiline`` and ``PrimitiveBoolean`` as real
nodes of the graph (unlike the legacy ``PrimitiveNode``, which the editor folds
into the widgets it feeds), so a template that uses them needs them to exist.
Their inputs and limits are ComfyUI's (``comfy_extras/nodes_primitive.py``), so
the same values validate the same way.
"""
from __future__ import annotations

import sys

from engine import types as T
from engine.node import Input, Output, define_node

CATEGORY = "utils/primitive"


@define_node("PrimitiveInt", category=CATEGORY, display_name="Int",
             inputs=[Input("value", T.INT, default=0, min=-sys.maxsize, max=sys.maxsize, control_after_generate=True)],
             outputs=[Output("INT", T.INT)])
def primitive_int(ctx, value: int):
    """A whole number, with the seed-style fixed/increment/randomize control after each run."""
    return (value,)


@define_node("PrimitiveFloat", category=CATEGORY, display_name="Float",
             inputs=[Input("value", T.FLOAT, default=0.0, min=-sys.maxsize, max=sys.maxsize)],
             outputs=[Output("FLOAT", T.FLOAT)])
def primitive_float(ctx, value: float):
    """A number."""
    return (value,)


@define_node("PrimitiveString", category=CATEGORY, display_name="String",
             inputs=[Input("value", T.STRING, default="")], outputs=[Output("STRING", T.STRING)])
def primitive_string(ctx, value: str):
    """A line of text."""
    return (value,)


@define_node("PrimitiveStringMultiline", category=CATEGORY, display_name="String (Multiline)",
             inputs=[Input("value", T.STRING, default="", multiline=True)], outputs=[Output("STRING", T.STRING)])
def primitive_string_multiline(ctx, value: str):
    """Text over several lines (a prompt shared by several nodes)."""
    return (value,)


@define_node("PrimitiveBoolean", category=CATEGORY, display_name="Boolean",
             inputs=[Input("value", T.BOOLEAN, default=False)], outputs=[Output("BOOLEAN", T.BOOLEAN)])
def primitive_boolean(ctx, value: bool):
    """True or false."""
    return (value,)


@define_node("StringConcatenate", category="utils/string", display_name="Concatenate",
             inputs=[Input("string_a", T.STRING, default="", multiline=True),
                     Input("string_b", T.STRING, default="", multiline=True),
                     Input("delimiter", T.STRING, default="")],
             outputs=[Output("STRING", T.STRING)])
def string_concatenate(ctx, string_a: str, string_b: str, delimiter: str = ""):
    """``string_a``, the delimiter, then ``string_b`` (ComfyUI's prompt-prefix templates use it)."""
    return (delimiter.join((string_a, string_b)),)
