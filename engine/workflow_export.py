"""A Kiln workflow written in ComfyUI's editor (litegraph) format, for ComfyUI's frontend.

ComfyUI's frontend opens only its editor format (templates, the saved-workflows
panel). This writes that format the way the frontend itself lays out a node from
``/object_info``: widget inputs (INT, FLOAT, STRING, BOOLEAN, combos) in the
declaration order, required before optional, each seed-like widget followed by
its control value ("fixed": Kiln's workflow holds the seed to use), and after
all of them the "image" value of an upload button (the frontend appends that
widget last, as a real frontend save shows), then the values of Kiln's own
additions, which the frontend does not know (``Input.comfy_hidden``); every other
input, and every widget input that is linked, is a slot. Kiln's named parameters travel in
``extra.kiln_params`` so nothing of the workflow is lost.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.node import NO_DEFAULT
from engine.workflow import Link, Workflow

NODE_WIDTH = 320
SLOT_HEIGHT = 22


def _ordered_inputs(spec: Any, node: Any) -> list[Any]:
    """The node's inputs as the frontend lays them out from ``/object_info``'s v3 specs: a dynamic
    combo's chosen option's sub-inputs right after it and no other option's; of a growing group,
    only the sockets the workflow uses (the frontend adds the spare one itself)."""
    subs = spec.option_input_names()
    out = []
    for inp in spec.comfy_input_order():
        if inp.name in subs or (inp.grow is not None and inp.name not in node.inputs):
            continue
        out.append(inp)
        if inp.dynamic:
            choice = node.inputs.get(inp.name)
            if not isinstance(choice, str):  # linked or unset: the widget shows the default
                choice = inp.default
            found = [spec.input(f"{inp.name}.{sub}") for sub in inp.dynamic.get(choice, ())]
            out += [i for i in found if i is not None]
    return out


def _layout(workflow: Workflow) -> dict[str, list[float]]:
    """Saved positions, else columns by depth in the graph (sources on the left)."""
    import networkx as nx

    graph = workflow.graph()
    depth: dict[str, int] = {}
    try:
        for node_id in nx.topological_sort(graph):
            depth[node_id] = max((depth[p] + 1 for p in graph.predecessors(node_id)), default=0)
    except nx.NetworkXUnfeasible:  # a cycle: validation's business, lay out in order
        depth = {node_id: i for i, node_id in enumerate(workflow.nodes)}
    rows: dict[int, int] = {}
    pos = {}
    for node_id, node in workflow.nodes.items():
        saved = node.ui.get("pos") if isinstance(node.ui, dict) else None
        if isinstance(saved, (list, tuple)) and len(saved) == 2:
            pos[node_id] = [float(saved[0]), float(saved[1])]
            continue
        col = depth.get(node_id, 0)
        row = rows.get(col, 0)
        rows[col] = row + 1
        pos[node_id] = [60.0 + col * (NODE_WIDTH + 60), 60.0 + row * 260]
    return pos


def to_comfy_ui(workflow: Workflow, registry: Any, env: Any = None) -> dict[str, Any]:
    """The workflow as ComfyUI's editor format (schema 0.4); unknown node types keep their inputs as slots."""
    ids: dict[str, int] = {}
    taken = {int(k) for k in workflow.nodes if str(k).isdigit()}
    spare = max(taken, default=0)
    for node_id in workflow.nodes:
        if str(node_id).isdigit():
            ids[node_id] = int(node_id)
        else:
            spare += 1
            ids[node_id] = spare
    pos = _layout(workflow)
    out_nodes: dict[str, dict[str, Any]] = {}
    links: list[list[Any]] = []
    for order, (node_id, node) in enumerate(workflow.nodes.items()):
        spec = registry.get(node.type) if node.type else None
        slots: list[dict[str, Any]] = []
        values: list[Any] = []
        uploads: list[Any] = []  # the frontend adds an upload button after all declared widgets
        own: list[Any] = []  # Kiln's additions (Input.comfy_hidden), after everything the frontend knows
        declared = _ordered_inputs(spec, node) if spec is not None else []
        for inp in declared:
            raw = node.inputs.get(inp.name)
            widget = inp.widget
            if widget:
                if raw is None or isinstance(raw, Link):  # not set, or fed by a link: the widget shows the default
                    raw_value = None if inp.default is NO_DEFAULT else inp.default
                else:
                    raw_value = raw
                (own if inp.comfy_hidden else values).append(raw_value)
                if inp.control_after_generate:
                    values.append("fixed")
                if inp.extra.get("image_upload"):
                    uploads.append("image")
            if not widget or isinstance(raw, Link):
                slot: dict[str, Any] = {"name": inp.name, "type": inp.type if inp.type != T.COMBO else "COMBO",
                                        "link": None}
                if widget:
                    slot["widget"] = {"name": inp.name}
                slots.append(slot)
        values += uploads + own
        if spec is None:  # not installed here: keep every input as a slot or a value
            for name, raw in node.inputs.items():
                if isinstance(raw, Link):
                    slots.append({"name": name, "type": "*", "link": None})
                else:
                    values.append(raw)
        outputs = [{"name": o.name, "type": o.type, "links": [], "slot_index": i}
                   for i, o in enumerate(spec.outputs)] if spec is not None else []
        height = 40 + SLOT_HEIGHT * (max(len(slots), len(outputs)) + len(values))
        entry: dict[str, Any] = {
            "id": ids[node_id], "type": node.type, "pos": pos[node_id], "size": [NODE_WIDTH, height],
            "flags": {}, "order": order, "mode": 0, "inputs": slots, "outputs": outputs,
            "properties": {"Node name for S&R": node.type}, "widgets_values": values,
        }
        if node.title:
            entry["title"] = node.title
        out_nodes[node_id] = entry
    for node_id, node in workflow.nodes.items():
        target = out_nodes[node_id]
        for name, raw in node.inputs.items():
            if not isinstance(raw, Link) or raw.node_id not in out_nodes:
                continue
            source = out_nodes[raw.node_id]
            slot_index = next((i for i, s in enumerate(target["inputs"]) if s["name"] == name), None)
            if slot_index is None:
                continue
            link_type = target["inputs"][slot_index]["type"]
            if raw.output < len(source["outputs"]):
                link_type = source["outputs"][raw.output]["type"]
                source["outputs"][raw.output]["links"].append(len(links) + 1)
            link_id = len(links) + 1
            target["inputs"][slot_index]["link"] = link_id
            links.append([link_id, source["id"], raw.output, target["id"], slot_index, link_type])
    extra: dict[str, Any] = {"ds": {"scale": 1, "offset": [0, 0]}}
    if workflow.params:
        extra["kiln_params"] = {name: [f"{n}.{i}" for n, i in workflow.param_targets(name)]
                                for name in workflow.params}
    for key in ("title", "description"):
        if isinstance(workflow.meta.get(key), str):
            extra[key] = workflow.meta[key]
    return {
        "last_node_id": max((n["id"] for n in out_nodes.values()), default=0),
        "last_link_id": len(links), "nodes": list(out_nodes.values()), "links": links,
        "groups": [], "config": {}, "extra": extra, "version": 0.4,
    }
