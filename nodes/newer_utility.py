"""ComfyUI's newer small utility nodes that its current templates use: ResolutionSelector,
CustomCombo and ComfyNumberConvert (ManualSigmas lives with the other sigma-list nodes, nodes/custom_schedulers.py).

Names, inputs, defaults, ranges and outputs are ComfyUI's, so a template holding these nodes
validates and runs here as it does there. ResolutionSelector follows the version of
``comfy_extras/nodes_resolution.py`` with the ``multiple`` input (the templates' editor files
store three widget values: ratio, megapixels, multiple).
"""
from __future__ import annotations

import math

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

#: ComfyUI's aspect-ratio choices, in its order, with the sides they stand for.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1 (Square)": (1, 1),
    "2:3 (Portrait Photo)": (2, 3),
    "3:2 (Photo)": (3, 2),
    "3:4 (Portrait Standard)": (3, 4),
    "4:3 (Standard)": (4, 3),
    "9:16 (Portrait Widescreen)": (9, 16),
    "16:9 (Widescreen)": (16, 9),
    "21:9 (Ultrawide)": (21, 9),
}


def resolution_for(ratio: tuple[int, int], megapixels: float, multiple: int) -> tuple[int, int]:
    """Width and height with the ratio's shape and about ``megapixels`` * 2^20 pixels.

    Each side is rounded to the nearest multiple of ``multiple`` with Python's round
    (halves to even), as ComfyUI rounds, so the same inputs give the same size there.
    """
    w_ratio, h_ratio = ratio
    unit = math.sqrt(megapixels * 1024 * 1024 / (w_ratio * h_ratio))
    return round(w_ratio * unit / multiple) * multiple, round(h_ratio * unit / multiple) * multiple


@define_node(
    "ResolutionSelector",
    category="utils",
    display_name="Resolution Selector",
    inputs=[
        Input("aspect_ratio", T.COMBO, default="1:1 (Square)", choices=list(ASPECT_RATIOS),
              tooltip="The shape of the result"),
        Input("megapixels", T.FLOAT, default=1.0, min=0.1, max=16.0, step=0.1,
              tooltip="Total pixels in millions of 2^20 (1.0 at 1:1 is 1024x1024)"),
        Input("multiple", T.INT, default=8, min=8, max=128, step=4,
              tooltip="Each side is rounded to the nearest multiple of this"),
    ],
    outputs=[Output("width", T.INT), Output("height", T.INT)],
)
def resolution_selector(ctx, aspect_ratio: str, megapixels: float, multiple: int = 8):
    """A width and height for an empty latent from a shape and a pixel budget, so a template
    can offer "16:9, 1 MP" instead of two numbers that must agree."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise NodeError(f"unknown aspect ratio '{aspect_ratio}'", "aspect_ratio")
    if multiple <= 0:
        raise NodeError(f"multiple must be positive, got {multiple}", "multiple")
    width, height = resolution_for(ASPECT_RATIOS[aspect_ratio], float(megapixels), int(multiple))
    if width <= 0 or height <= 0:
        raise NodeError(f"{megapixels} megapixels rounds to {width}x{height} at multiples of {multiple}",
                        "megapixels")
    return (width, height)


@define_node(
    "CustomCombo",
    category="utils",
    display_name="Custom Combo",
    inputs=[
        # The choices are the options the user typed on the node, which the editor keeps to itself
        # (saved after ``index`` in widgets_values, sent as option1, option2, ... in the API form):
        # the server has no list to check against, so any text is taken, as in ComfyUI.
        Input("choice", T.COMBO, choices=[], open_choices=True),
        Input("index", T.INT, default=0, optional=True,
              tooltip="The choice's position among the options (the editor sets it)"),
    ],
    outputs=[Output("STRING", T.STRING), Output("INDEX", T.INT)],
)
def custom_combo(ctx, choice: str, index: int = 0):
    """The chosen option's text and its position, so one dropdown can drive both a prompt and a
    number (a preset table's row)."""
    return (str(choice), int(index))


@define_node(
    "ComfyNumberConvert",
    category="math",
    display_name="Number Convert",
    inputs=[Input("value", f"{T.INT},{T.FLOAT},{T.STRING},{T.BOOLEAN}",
                  tooltip="A number, a yes/no or a text holding a number")],
    outputs=[Output("FLOAT", T.FLOAT), Output("INT", T.INT)],
)
def number_convert(ctx, value):
    """One value as both a FLOAT and an INT, so a text field or a switch can drive a number input.

    ComfyUI's rules: a boolean is 1 or 0; a float's INT drops the fraction (towards zero); a
    text is read as an integer when it is one (so "12345678901234567891" keeps every digit)
    and otherwise as a float; an empty text and any non-finite value are errors.
    """
    if isinstance(value, bool):
        return (float(value), int(value))
    if isinstance(value, int):
        try:
            as_float, as_int = float(value), value
        except OverflowError:
            raise NodeError(f"{value} is too large for a FLOAT", "value") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise NodeError(f"cannot convert {value} to a number", "value")
        as_float, as_int = value, int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise NodeError("cannot convert an empty text to a number", "value")
        try:
            as_float = float(text)
        except ValueError:
            raise NodeError(f"cannot read a number from {value!r}", "value") from None
        if not math.isfinite(as_float):
            raise NodeError(f"cannot convert {value!r} to a finite number", "value")
        try:
            as_int = int(text)
        except ValueError:
            as_int = int(as_float)
    else:
        raise NodeError(f"cannot convert a {type(value).__name__} to a number", "value")
    return (as_float, as_int)
