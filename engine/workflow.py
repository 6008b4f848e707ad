"""Workflow files: one in-memory shape for Kiln's format and ComfyUI's API format.

Kiln's format (versioned, editable and executable)::

    {"version": 1,
     "params": {"strength": "4.strength"},
     "nodes": {"4": {"type": "AddNoise", "inputs": {"latent": ["3", 0], "strength": 0.6},
                     "ui": {"pos": [40, 80]}}}}

ComfyUI's API format is ``{"4": {"class_type": "AddNoise", "inputs": {...}, "_meta": {...}}}``
(optionally wrapped in ``{"prompt": ...}`` as ``/prompt`` bodies are). Both parse to
:class:`Workflow`; parsing never raises for a problem inside one node, it records it
so validation can report every problem at once.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import networkx as nx

KILN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Link:
    """A connection to output ``output`` of node ``node_id``."""

    node_id: str
    output: int

    def to_json(self) -> list:
        return [self.node_id, self.output]


@dataclass
class NodeInstance:
    id: str
    type: str | None
    inputs: dict[str, Any] = field(default_factory=dict)
    ui: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    #: Structural problems found while parsing: (input name or None, message).
    problems: list[tuple[str | None, str]] = field(default_factory=list)

    def links(self) -> dict[str, Link]:
        return {name: v for name, v in self.inputs.items() if isinstance(v, Link)}


class WorkflowFormatError(ValueError):
    """The document is not a workflow at all (not an object, no nodes)."""


@dataclass
class Workflow:
    nodes: dict[str, NodeInstance]
    #: Named parameters: name -> (node id, input name) of its first target.
    params: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Parameters that set several inputs at once (one "seed" for AddNoise and
    #: KSampler): name -> every target. Absent for single-target parameters.
    param_fanout: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source_format: str = "kiln"
    #: Problems with the workflow as a whole (bad params declarations).
    problems: list[str] = field(default_factory=list)

    # -- building graphs -------------------------------------------------------------

    def graph(self) -> nx.MultiDiGraph:
        """Nodes are ids; an edge source -> target per link, keyed by the input name."""
        g = nx.MultiDiGraph()
        for node in self.nodes.values():
            g.add_node(node.id, type=node.type)
        for node in self.nodes.values():
            for name, link in node.links().items():
                if link.node_id in self.nodes:
                    g.add_edge(link.node_id, node.id, key=name, output=link.output, input=name)
        return g

    # -- parameters --------------------------------------------------------------------

    def resolve_param(self, name: str) -> tuple[str, str] | None:
        """A named parameter or a ``NODE.INPUT`` reference to (node id, input)."""
        if name in self.params:
            return self.params[name]
        node_id, dot, input_name = name.rpartition(".")
        if dot and node_id in self.nodes and input_name:
            return node_id, input_name
        return None

    def param_targets(self, name: str) -> list[tuple[str, str]]:
        """Every (node id, input) that parameter ``name`` sets; empty if it names nothing."""
        if name in self.param_fanout:
            return list(self.param_fanout[name])
        target = self.resolve_param(name)
        return [target] if target else []

    def with_overrides(self, values: Mapping[str, Any]) -> "Workflow":
        """A copy with literal inputs replaced; unknown names raise with all of them listed."""
        unknown = [name for name in values if self.resolve_param(name) is None]
        if unknown:
            known = ", ".join(sorted(self.params)) or "none declared"
            raise KeyError(
                f"unknown parameter(s) {', '.join(unknown)}: use a named parameter ({known}) or NODE_ID.INPUT"
            )
        new = copy.deepcopy(self)
        for name, value in values.items():
            for node_id, input_name in new.param_targets(name):
                new.nodes[node_id].inputs[input_name] = copy.deepcopy(value)
        return new

    # -- writing -------------------------------------------------------------------------

    def to_kiln(self) -> dict[str, Any]:
        nodes = {}
        for node in self.nodes.values():
            entry: dict[str, Any] = {"type": node.type, "inputs": _dump_inputs(node.inputs)}
            if node.title:
                entry["title"] = node.title
            if node.ui:
                entry["ui"] = node.ui
            nodes[node.id] = entry
        doc: dict[str, Any] = {"version": KILN_FORMAT_VERSION}
        doc.update({k: v for k, v in self.meta.items() if k not in ("version", "nodes", "params")})
        if self.params:
            doc["params"] = {
                name: [f"{n}.{i}" for n, i in self.param_fanout[name]] if name in self.param_fanout else f"{nid}.{inp}"
                for name, (nid, inp) in self.params.items()}
        doc["nodes"] = nodes
        return doc

    def to_api(self) -> dict[str, Any]:
        """ComfyUI's API format, as its `prompt` PNG chunk and `/prompt` carry it."""
        out = {}
        for node in self.nodes.values():
            entry: dict[str, Any] = {"class_type": node.type, "inputs": _dump_inputs(node.inputs, wrap_lists=True)}
            if node.title:
                entry["_meta"] = {"title": node.title}
            out[node.id] = entry
        return out


def _dump_inputs(inputs: Mapping[str, Any], wrap_lists: bool = False) -> dict[str, Any]:
    out = {}
    for name, value in inputs.items():
        if isinstance(value, Link):
            out[name] = value.to_json()
        elif isinstance(value, list):
            out[name] = {"__value__": value}
        else:
            out[name] = value
    return out


def _parse_input(value: Any) -> tuple[Any, str | None]:
    """A raw input value to a literal or a Link; the second item is a problem, if any."""
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return value["__value__"], None
    if isinstance(value, list):
        if (
            len(value) == 2
            and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool)
            and isinstance(value[1], (int, float))
            and not isinstance(value[1], bool)
            and float(value[1]).is_integer()
        ):
            return Link(str(value[0]), int(value[1])), None
        return value, "a list must be a link [node_id, output_index]; wrap a list value as {\"__value__\": [...]}"
    return value, None


def _parse_node(node_id: str, raw: Any, type_key: str) -> NodeInstance:
    if not isinstance(raw, dict):
        return NodeInstance(node_id, None, problems=[(None, "node entry must be an object")])
    node_type = raw.get(type_key)
    node = NodeInstance(node_id, node_type if isinstance(node_type, str) and node_type else None)
    if node.type is None:
        node.problems.append((None, f"node has no '{type_key}'"))
    raw_inputs = raw.get("inputs", {})
    if not isinstance(raw_inputs, dict):
        node.problems.append((None, "'inputs' must be an object"))
        raw_inputs = {}
    for name, value in raw_inputs.items():
        parsed, problem = _parse_input(value)
        node.inputs[str(name)] = parsed
        if problem:
            node.problems.append((str(name), problem))
    meta = raw.get("_meta") if isinstance(raw.get("_meta"), dict) else {}
    title = raw.get("title") or meta.get("title")
    node.title = title if isinstance(title, str) else None
    ui = raw.get("ui")
    node.ui = dict(ui) if isinstance(ui, dict) else {}
    return node


def is_api_format(doc: Mapping[str, Any]) -> bool:
    return bool(doc) and all(isinstance(v, dict) and "class_type" in v for v in doc.values())


def decode(doc: Any) -> Any:
    """A document given as JSON text decoded; anything else as it is."""
    if isinstance(doc, (str, bytes)):
        try:
            return json.loads(doc)
        except json.JSONDecodeError as exc:
            raise WorkflowFormatError(f"not valid JSON: {exc}") from exc
        except RecursionError:
            raise WorkflowFormatError("the JSON nests too deeply to be a workflow") from None
    return doc


def parse(doc: Any) -> Workflow:
    """Parse a Kiln or ComfyUI API-format document.

    ComfyUI's editor (UI) format needs the node declarations to convert:
    :func:`engine.formats.parse_document` takes every format.
    """
    doc = decode(doc)
    if not isinstance(doc, dict):
        raise WorkflowFormatError("a workflow must be a JSON object")
    if "prompt" in doc and isinstance(doc["prompt"], dict) and "nodes" not in doc:
        doc = doc["prompt"]
    if isinstance(doc.get("nodes"), dict):
        return _parse_kiln(doc)
    if isinstance(doc.get("nodes"), list) and "links" in doc:
        raise WorkflowFormatError(
            "this is a ComfyUI editor (UI-format) workflow; export it with 'Save (API Format)' "
            "or open it in Kiln's editor, which converts it"
        )
    if is_api_format(doc):
        nodes = {str(k): _parse_node(str(k), v, "class_type") for k, v in doc.items()}
        return Workflow(nodes=nodes, source_format="comfyui-api")
    if doc and all(isinstance(v, dict) for v in doc.values()):
        # Looks like API format with some entries missing class_type: parse to report them.
        nodes = {str(k): _parse_node(str(k), v, "class_type") for k, v in doc.items()}
        return Workflow(nodes=nodes, source_format="comfyui-api")
    raise WorkflowFormatError("no nodes: expected {\"version\": 1, \"nodes\": {...}} or a ComfyUI API prompt")


def _parse_kiln(doc: Mapping[str, Any]) -> Workflow:
    version = doc.get("version", KILN_FORMAT_VERSION)
    if not isinstance(version, int) or version > KILN_FORMAT_VERSION:
        raise WorkflowFormatError(
            f"workflow version {version!r} is newer than this Kiln understands ({KILN_FORMAT_VERSION})"
        )
    nodes = {}
    for key, raw in doc["nodes"].items():
        type_key = "type" if not (isinstance(raw, dict) and "class_type" in raw and "type" not in raw) else "class_type"
        nodes[str(key)] = _parse_node(str(key), raw, type_key)
    wf = Workflow(nodes=nodes, source_format="kiln")
    wf.meta = {k: v for k, v in doc.items() if k not in ("nodes", "params", "version")}
    params = doc.get("params", {})
    if not isinstance(params, dict):
        wf.problems.append("'params' must be an object of name -> \"NODE_ID.INPUT\" (or a list of them)")
        params = {}
    for name, declared in params.items():
        targets = []
        for target in declared if isinstance(declared, list) else [declared]:
            node_id, dot, input_name = str(target).rpartition(".")
            if not dot or node_id not in nodes or not input_name:
                wf.problems.append(f"parameter '{name}' points at '{target}', which is not NODE_ID.INPUT of a node here")
                continue
            targets.append((node_id, input_name))
        if targets:
            wf.params[str(name)] = targets[0]
            if len(targets) > 1:
                wf.param_fanout[str(name)] = targets
    return wf


def load(path: str | Path) -> Workflow:
    return parse(Path(path).read_text(encoding="utf-8"))
