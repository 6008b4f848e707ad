"""Stub nodes for engine tests: arithmetic, string joins and a record of what ran."""
from __future__ import annotations

import threading

from engine import types as T
from engine.context import NodeError
from engine.node import ALWAYS, Input, Output, Result, define_node
from engine.registry import Registry

RAN: list[str] = []
#: Set by tests that need a node to block until interrupted.
GATE = threading.Event()


def _record(ctx) -> None:
    RAN.append(ctx.node_id)


@define_node("Number", category="test", inputs=[Input("value", T.FLOAT, default=0.0, min=-1000, max=1000)],
             outputs=[Output("value", T.FLOAT)])
def number(ctx, value):
    _record(ctx)
    return (value,)


@define_node("Add", category="test", inputs=[Input("a", T.FLOAT), Input("b", T.FLOAT, default=0.0)],
             outputs=[Output("sum", T.FLOAT)])
def add(ctx, a, b=0.0):
    _record(ctx)
    return (a + b,)


@define_node("Multiply", category="test", inputs=[Input("a", T.FLOAT), Input("b", T.FLOAT, default=1.0)],
             outputs=[Output("product", T.FLOAT)])
def multiply(ctx, a, b=1.0):
    _record(ctx)
    return (a * b,)


@define_node("Count", category="test", inputs=[Input("n", T.INT, default=3, min=1, max=10)],
             outputs=[Output("n", T.INT)])
def count(ctx, n):
    _record(ctx)
    return (n,)


@define_node("Join", category="test",
             inputs=[Input("a", T.STRING, default=""), Input("b", T.STRING, default=""),
                     Input("sep", T.COMBO, default=" ", choices=[" ", "-", ","])],
             outputs=[Output("text", T.STRING)])
def join(ctx, a, b, sep):
    _record(ctx)
    return (f"{a}{sep}{b}",)


@define_node("Format", category="test", inputs=[Input("value", T.FLOAT)], outputs=[Output("text", T.STRING)])
def format_number(ctx, value):
    _record(ctx)
    return (f"{value:g}",)


@define_node("Show", category="test", output_node=True, inputs=[Input("text", T.STRING)])
def show(ctx, text):
    _record(ctx)
    return Result(ui={"text": [text]})


@define_node("Blob", category="test", inputs=[Input("size", T.INT, default=1000, min=0, max=10**9),
                                             Input("tag", T.STRING, default="")],
             outputs=[Output("blob", "BLOB")])
def blob(ctx, size, tag):
    _record(ctx)
    return (bytearray(size),)


@define_node("BlobSize", category="test", output_node=True,
             inputs=[Input("blob", "BLOB"), Input("label", T.STRING, default="")])
def blob_size(ctx, blob, label):
    _record(ctx)
    return Result(ui={"text": [str(len(blob))]})


@define_node("Fail", category="test", inputs=[Input("value", T.FLOAT)], outputs=[Output("value", T.FLOAT)])
def fail(ctx, value):
    _record(ctx)
    raise NodeError(f"refusing {value}", input_name="value")


@define_node("Slow", category="test", inputs=[Input("value", T.FLOAT), Input("ticks", T.INT, default=50)],
             outputs=[Output("value", T.FLOAT)])
def slow(ctx, value, ticks):
    """Ticks progress until interrupted; signals GATE after its first tick."""
    _record(ctx)
    for i in range(ticks):
        ctx.progress(i + 1, ticks)
        GATE.set()
        threading.Event().wait(0.01)
    return (value,)


@define_node("Clock", category="test", fingerprint=lambda env, inputs: ALWAYS, outputs=[Output("t", T.FLOAT)])
def clock(ctx):
    _record(ctx)
    return (1.0,)


def make_registry() -> Registry:
    import sys

    registry = Registry()
    registry.add_module(sys.modules[__name__])
    return registry


def switch_executor(folder) -> "Executor":
    """An executor over the stub nodes and ComfyUI's Switch (lazy inputs), on a data folder."""
    from engine.context import Environment
    from engine.executor import Executor
    from nodes import logic

    registry = make_registry()
    registry.add(logic.comfy_switch)
    return Executor(registry, Environment.for_folder(folder))
