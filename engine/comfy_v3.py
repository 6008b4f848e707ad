"""Kiln's input declarations in the shape ComfyUI's ``/object_info`` gives its newer (v3) nodes.

Kiln keeps every input flat (``resize_type.width``, ``images.image0``): that is how ComfyUI's
API form names them, so validation and execution need nothing special. ComfyUI's frontend,
though, builds a dynamic combo's option widgets and a growing group's sockets only from the
nested specs ``COMFY_DYNAMICCOMBO_V3`` and ``COMFY_AUTOGROW_V3``; shown flat, it would draw every
option's widgets at once and all fifty image sockets. This module folds the flat declarations
into those specs, from :attr:`Input.dynamic` and :attr:`Input.grow`, so the one declaration
serves both.
"""
from __future__ import annotations

from typing import Any

from engine import types as T

# The declarations (engine.node's Input, Grow and NodeSpec) are taken as they come, not imported:
# engine.node builds its /object_info from here.

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
AUTOGROW = "COMFY_AUTOGROW_V3"


def plain_spec(inp: Any, env: Any = None) -> list:
    """One input (an :class:`engine.node.Input`) as ``[type_or_choices, options]``, the options left
    out when empty; ComfyUI's clients see ComfyUI's default where it differs from Kiln's."""
    head: Any = inp.choice_list(env) if inp.type == T.COMBO else inp.type
    opts = inp.comfy_options()
    return [head, opts] if opts else [head]


def dynamic_combo_spec(spec: Any, combo: Any, env: Any = None) -> list:
    """A dynamic combo with, per choice, the sub-inputs it brings under their own names.

    A sub-input is listed as required within its option even where Kiln declares it optional:
    Kiln's flag only means "not needed by the other choices", and within its option the value is
    needed, as ComfyUI declares it.
    """
    opts = combo.options()
    options = []
    for key in combo.choice_list(env):
        subs = {}
        for sub in (combo.dynamic or {}).get(key, ()):
            inp = spec.input(f"{combo.name}.{sub}")
            if inp is not None:
                subs[sub] = plain_spec(inp, env)
        options.append({"key": key, "inputs": {"required": subs}})
    return [DYNAMIC_COMBO, {**opts, "options": options}]


def autogrow_spec(grow: Any, first: Any, env: Any = None) -> list:
    """A growing group as one input whose template is its first socket's declaration.

    A widget-typed template is forced to a socket, as ComfyUI does: growing inputs are links.
    """
    template = plain_spec(first, env)
    if first.type in T.WIDGET_TYPES:
        template = [template[0], {**(template[1] if len(template) > 1 else {}), "forceInput": True}]
    body: dict[str, Any] = {"input": {"required": {grow.template: template}}, "min": grow.min}
    if grow.names:
        body["names"] = list(grow.names)
    else:
        body.update(prefix=grow.prefix, max=grow.count)
    return [AUTOGROW, {"template": body}]


def comfy_inputs(spec: Any, env: Any = None) -> tuple[dict[str, list], dict[str, list]]:
    """The node's required and optional inputs as ``/object_info`` lists them, in ComfyUI's order:
    a dynamic combo's sub-inputs folded into it, a growing group into one input where it starts."""
    subs = spec.option_input_names()
    required: dict[str, list] = {}
    optional: dict[str, list] = {}
    seen: set[str] = set()
    for inp in spec.comfy_input_order():
        if inp.name in subs or inp.comfy_hidden:
            continue
        if inp.grow is not None:
            if inp.grow.group in seen:
                continue
            seen.add(inp.grow.group)
            (required if inp.grow.min > 0 else optional)[inp.grow.group] = autogrow_spec(inp.grow, inp, env)
            continue
        entry = dynamic_combo_spec(spec, inp, env) if inp.dynamic else plain_spec(inp, env)
        (optional if inp.optional else required)[inp.name] = entry
    return required, optional
