"""ComfyUI's editor (UI, "litegraph") format, converted to a Kiln workflow.

ComfyUI keeps two formats and converts between them only in its browser code; a
saved editor file cannot be run headless. Kiln converts it here, with the node
declarations: ``widgets_values`` is positional, in the order of a node's widget
inputs, and a seed-like widget (``control_after_generate``) is followed by one extra
value ("fixed", "randomize", ...) that is not an input. Muted nodes are dropped,
bypassed nodes and Reroutes pass their input straight through, Notes are ignored,
and Primitive nodes become the literal value of the widgets they feed.
"""
from __future__ import annotations

from typing import Any, Mapping

from engine import types as T
from engine.registry import Registry
from engine.workflow import Link, NodeInstance, Workflow, WorkflowFormatError

MODE_MUTED, MODE_BYPASS = 2, 4
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
PASS_THROUGH = {"Reroute"}
IGNORED = {"Note", "MarkdownNote"}
PRIMITIVES = {"PrimitiveNode"}


def is_ui_format(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and "links" in doc


def _links_table(doc: Mapping[str, Any]) -> dict[int, tuple[str, int, str, int]]:
    """link id -> (origin node id, origin slot, target node id, target slot), both schema versions."""
    table = {}
    for link in doc.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            lid, o_id, o_slot, t_id, t_slot = link[:5]
        elif isinstance(link, dict):
            lid, o_id, o_slot = link.get("id"), link.get("origin_id"), link.get("origin_slot")
            t_id, t_slot = link.get("target_id"), link.get("target_slot")
        else:
            continue
        table[int(lid)] = (str(o_id), int(o_slot), str(t_id), int(t_slot))
    return table


def from_comfy_ui(doc: Mapping[str, Any], registry: Registry) -> Workflow:
    if not is_ui_format(doc):
        raise WorkflowFormatError("not a ComfyUI editor workflow")
    raw_nodes = {str(n.get("id")): n for n in doc["nodes"] if isinstance(n, dict)}
    links = _links_table(doc)

    def source_of(slot_input: Mapping[str, Any]) -> Link | None:
        link_id = slot_input.get("link")
        if link_id is None or int(link_id) not in links:
            return None
        origin_id, origin_slot, _, _ = links[int(link_id)]
        return _follow(origin_id, origin_slot, set())

    def _follow(origin_id: str, origin_slot: int, seen: set[str]) -> Link | None:
        origin = raw_nodes.get(origin_id)
        if origin is None or origin_id in seen:
            return None
        seen.add(origin_id)
        kind, mode = origin.get("type"), origin.get("mode", 0)
        if kind in PASS_THROUGH or mode == MODE_BYPASS:
            out_type = _slot_type(origin.get("outputs"), origin_slot)
            for inp in origin.get("inputs") or []:
                if inp.get("link") is not None and (kind in PASS_THROUGH or T.compatible(inp.get("type", "*"), out_type)):
                    link = links.get(int(inp["link"]))
                    if link:
                        return _follow(link[0], link[1], seen)
            return None
        if mode == MODE_MUTED or kind in PRIMITIVES:
            return None
        return Link(origin_id, origin_slot)

    primitive_values = _primitive_values(raw_nodes, links)
    nodes: dict[str, NodeInstance] = {}
    for node_id, raw in raw_nodes.items():
        kind = raw.get("type")
        if kind in IGNORED | PASS_THROUGH | PRIMITIVES or raw.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        node = NodeInstance(node_id, kind if isinstance(kind, str) else None, title=raw.get("title"))
        pos = raw.get("pos")
        if isinstance(pos, dict):
            pos = [pos.get("0", 0), pos.get("1", 0)]
        node.ui = {"pos": pos} if pos else {}
        spec = registry.get(kind) if isinstance(kind, str) else None
        slot_inputs = {i.get("name"): i for i in raw.get("inputs") or [] if isinstance(i, dict)}
        values = _widget_values(raw, spec)
        for name, value in values.items():
            node.inputs[name] = value
        for name, slot_input in slot_inputs.items():
            link = source_of(slot_input)
            if link is not None:
                node.inputs[name] = link
            elif (node_id, name) in primitive_values:
                node.inputs[name] = primitive_values[(node_id, name)]
        nodes[node_id] = node
    # Links into dropped nodes (muted branches) would be dangling: drop them as the frontend does.
    for node in nodes.values():
        for name, value in list(node.inputs.items()):
            if isinstance(value, Link) and value.node_id not in nodes:
                del node.inputs[name]
    return Workflow(nodes=nodes, source_format="comfyui-ui")


def _slot_type(slots: Any, index: int) -> str:
    try:
        return str(slots[index].get("type", "*"))
    except (IndexError, TypeError, AttributeError):
        return "*"


def _widget_values(raw: Mapping[str, Any], spec: Any) -> dict[str, Any]:
    values = raw.get("widgets_values")
    if isinstance(values, dict):
        return dict(values)
    if not isinstance(values, list) or spec is None:
        return {}
    out: dict[str, Any] = {}
    queue = list(values)
    for inp in spec.inputs:
        if inp.type not in T.WIDGET_TYPES or not queue:
            continue
        out[inp.name] = queue.pop(0)
        if inp.control_after_generate and queue and queue[0] in CONTROL_VALUES:
            queue.pop(0)
    return out


def _primitive_values(raw_nodes: Mapping[str, Any], links: Mapping[int, tuple]) -> dict[tuple[str, str], Any]:
    """(target node id, input name) -> the value a Primitive node feeds it."""
    out = {}
    for node_id, raw in raw_nodes.items():
        if raw.get("type") not in PRIMITIVES or not raw.get("widgets_values"):
            continue
        value = raw["widgets_values"][0]
        for output in raw.get("outputs") or []:
            for link_id in output.get("links") or []:
                link = links.get(int(link_id))
                if link:
                    target = raw_nodes.get(link[2], {})
                    slots = target.get("inputs") or []
                    if 0 <= link[3] < len(slots):
                        out[(link[2], slots[link[3]].get("name"))] = value
    return out
