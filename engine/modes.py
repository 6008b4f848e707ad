"""Bypass and mute: which nodes of a workflow run, and what a bypassed node passes on.

ComfyUI's node modes: 2 ("never", shown as muted) and 4 (bypass). A muted node does
not run and nothing reads from it: an input it fed is left unconnected (a required
one is then reported missing, naming the reader). A bypassed node does not run
either, but each of its outputs passes on one of its inputs, chosen by
:func:`bypass_index` (ComfyUI's rule), so "bypass the LoRA" or "bypass AddNoise"
keeps the graph working.

Kiln's document keeps the mode in the node's ``ui`` (``"mode": "bypass"`` or
``"mute"``, also ComfyUI's numbers 2 and 4), so a workflow saved from the editor
runs the same from ``kiln run``, ``/api/jobs``, ``/prompt`` and the editor itself:
every front door validates through :func:`engine.validate.validate`, which plans the
workflow :func:`apply_modes` returns. The document itself is left whole (history,
PNG metadata and "open this run" keep the bypassed nodes). ComfyUI's editor files
are converted by :mod:`engine.workflow_ui`, which follows links through bypassed
nodes with the same :func:`bypass_index`.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

from engine import types as T
from engine.registry import Registry
from engine.workflow import Link, NodeInstance, Workflow

MUTE, BYPASS = "mute", "bypass"
#: ComfyUI's numeric modes (LGraphEventMode) and the words the editor writes.
_MODES = {2: MUTE, 4: BYPASS, MUTE: MUTE, BYPASS: BYPASS, "never": MUTE}


def node_mode(node: NodeInstance) -> str | None:
    """``"mute"``, ``"bypass"`` or None (the node runs)."""
    value = node.ui.get("mode") if isinstance(node.ui, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return _MODES.get(value)


def bypass_index(input_types: Sequence[str], slot: int, out_type: str, wanted: str) -> int:
    """Which input a bypassed node passes to its output ``slot`` (ComfyUI's rule), or -1.

    ``input_types`` are the node's input sockets in order. The input at the same
    index when its type fits both the output and the reader; else the first input
    of exactly the reader's type; else the first that fits both.
    """
    if wanted in ("*", ""):
        return slot if slot < len(input_types) else (0 if input_types else -1)
    if slot < len(input_types):
        t = input_types[slot]
        if T.compatible(t, out_type) and T.compatible(t, wanted):
            return slot
    for i, t in enumerate(input_types):
        if t == wanted:
            return i
    for i, t in enumerate(input_types):
        if T.compatible(t, out_type) and T.compatible(t, wanted):
            return i
    return -1


def apply_modes(workflow: Workflow, registry: Registry) -> Workflow:
    """The workflow that runs: muted and bypassed nodes gone, links through bypassed nodes followed.

    Returns ``workflow`` itself when no node has a mode. Links to nodes that do
    not exist, and nodes of unknown types, are left for validation to report.
    """
    modes = {nid: m for nid, node in workflow.nodes.items() if (m := node_mode(node))}
    if not modes:
        return workflow

    def sockets(node: NodeInstance) -> list[tuple[str, str]]:
        spec = registry.get(node.type) if node.type else None
        if spec is None:
            return []
        # The node's sockets as ComfyUI numbers them: link-only inputs, and widgets fed by a link.
        return [(i.name, i.type) for i in spec.inputs
                if not i.widget or isinstance(node.inputs.get(i.name), Link)]

    def follow(link: Link, wanted: str, depth: int = 0) -> Link | None:
        mode = modes.get(link.node_id)
        if mode is None:
            return link
        if mode == MUTE or depth > len(workflow.nodes):
            return None
        node = workflow.nodes[link.node_id]
        spec = registry.get(node.type) if node.type else None
        if spec is None:
            return None
        out_type = spec.outputs[link.output].type if 0 <= link.output < len(spec.outputs) else T.ANY
        socks = sockets(node)
        index = bypass_index([t for _, t in socks], link.output, out_type, wanted)
        fed = node.inputs.get(socks[index][0]) if index >= 0 else None
        return follow(fed, wanted, depth + 1) if isinstance(fed, Link) else None

    out = copy.copy(workflow)
    out.nodes = {}
    for nid, node in workflow.nodes.items():
        if nid in modes:
            continue
        spec = registry.get(node.type) if node.type else None
        inputs: dict[str, Any] = {}
        for name, value in node.inputs.items():
            if isinstance(value, Link) and value.node_id in modes:
                inp = spec.input(name) if spec is not None else None
                value = follow(value, inp.type if inp is not None else T.ANY)
                if value is None:
                    continue  # fed by a muted node (or a bypass with nothing to pass): unconnected
            inputs[name] = value
        out.nodes[nid] = copy.copy(node)
        out.nodes[nid].inputs = inputs
    return out
