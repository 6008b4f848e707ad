"""ComfyUI's editor (UI, "litegraph") format, converted to a Kiln workflow document.

ComfyUI keeps two formats and converts between them only in its browser code, so a
saved editor file cannot be run headless there. Kiln converts it here, once, for
every front door: ``kiln run``/``kiln validate``, ``/prompt`` and ``/api/jobs``, and
Kiln's own editor, which sends a dropped editor file to ``POST /api/convert/comfyui``
rather than keeping a second converter that could disagree with this one.

What the conversion has to know, learnt from ComfyUI's frontend (its
``graphToPrompt`` and the subgraph classes behind it):

* ``widgets_values`` is positional, in the node's widget order (required inputs,
  then optional ones, as ``/object_info`` lists them; :meth:`NodeSpec.widget_order`).
  A seed-like widget (``control_after_generate``) is followed by its mode,
  "fixed"/"increment"/"decrement"/"randomize", or a boolean in files from before
  those words existed; an image-upload combo's upload button leaves its value
  ("image") after all the node's widgets in current files (LoadImageMask: [file,
  "alpha", "image"]), after the required ones in older ones: it is skipped where it
  stands. Neither is an input. A widget the editor does not serialize (hidden
  ones, ``serialize: false``) still holds its index, as ``null``. A widget converted to an input keeps its slot in
  the list; the link wins.
* A dynamic combo (ComfyUI's DynamicCombo, :attr:`Input.dynamic`) is followed by the
  widget values of the option it holds, then the node's next widget: ``["scale dimensions",
  512, 512, "center", "area"]`` is resize_type, resize_type.width, .height, .crop, scale_method.
  Growing inputs (Autogrow, :class:`~engine.node.Grow`: ``images.image0``, ``values.a``) are
  sockets, listed in ``inputs`` by those names like any other.
* Muted nodes (mode 2) vanish, and so does whatever reads only from them.
  Bypassed nodes (mode 4) pass an input of the wanted type through. Reroutes pass
  their input through; Notes are ignored; the legacy ``PrimitiveNode`` becomes the
  literal value of each widget it feeds. The newer ``PrimitiveInt``/``...String``
  nodes are real nodes and stay.
* A subgraph is a definition in ``definitions.subgraphs`` and an instance is a node
  whose type is the definition's id. Instances are expanded in place: inner nodes
  get the id ``"<instance id>:<inner id>"`` (nested: ``"4:7:2"``), the ids
  ComfyUI's frontend gives them. An inner input fed by the subgraph's input node
  takes what feeds the instance's matching input; an unlinked instance input with
  a promoted widget gives that widget's value (positional over the promoted
  inputs, when the instance stores them), else the inner widget keeps its own
  value. An instance's output is whatever feeds the subgraph's output node.
  A definition that contains itself, directly or through others, nesting past
  :data:`MAX_SUBGRAPH_DEPTH`, and an expansion past :data:`MAX_EXPANDED_NODES` nodes
  are refused with a :class:`ConversionError`.

The result is a plain Kiln-format dict (JSON), so this module needs nothing from
``engine.workflow``; ``engine.formats.parse_document`` parses what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from engine import types as T
from engine.modes import bypass_index
from engine.registry import Registry

MODE_MUTED, MODE_BYPASS = 2, 4
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
REROUTES = frozenset({"Reroute"})
IGNORED = frozenset({"Note", "MarkdownNote"})
LEGACY_PRIMITIVE = "PrimitiveNode"
SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = -10, -20
#: ComfyUI's own templates nest two deep; this leaves room and stops runaway files.
MAX_SUBGRAPH_DEPTH = 16
#: Expanded size cap: a subgraph used k times inside one used k times ... grows as k^depth,
#: so depth alone does not stop a small file from expanding into billions of nodes.
MAX_EXPANDED_NODES = 20000


class ConversionError(ValueError):
    """The editor file cannot be converted at all (a subgraph cycle, nesting too deep)."""


def is_ui_format(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("nodes"), list) and "links" in doc


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


def _links(raw_links: Any) -> dict[int, _Link]:
    """link id -> link, from either schema's links (tuples in 0.4, objects in 1 and subgraphs)."""
    table: dict[int, _Link] = {}
    for link in raw_links or []:
        try:
            if isinstance(link, list) and len(link) >= 5:
                lid, o_id, o_slot, t_id, t_slot = link[:5]
                kind = link[5] if len(link) > 5 else "*"
            elif isinstance(link, dict):
                lid, o_id, o_slot = link["id"], link["origin_id"], link["origin_slot"]
                t_id, t_slot, kind = link["target_id"], link["target_slot"], link.get("type", "*")
            else:
                continue
            table[int(lid)] = _Link(str(o_id), int(o_slot), str(t_id), int(t_slot), str(kind))
        except (KeyError, TypeError, ValueError):
            continue
    return table


@dataclass
class _Graph:
    """One level of the file: the root graph or a subgraph definition."""

    nodes: dict[str, dict[str, Any]]
    links: dict[int, _Link]
    id: str | None = None  # the definition's id; None for the root
    name: str = ""
    inputs: list[dict[str, Any]] = field(default_factory=list)  # a definition's input slots
    origin: tuple[float, float] = (0.0, 0.0)  # where its nodes' coordinates start

    @classmethod
    def read(cls, raw: Mapping[str, Any], def_id: str | None = None) -> "_Graph":
        nodes = {str(n.get("id")): n for n in raw.get("nodes") or [] if isinstance(n, dict)}
        inputs = [i for i in raw.get("inputs") or [] if isinstance(i, dict)]
        origin = (0.0, 0.0)
        bounding = (raw.get("inputNode") or {}).get("bounding") if isinstance(raw.get("inputNode"), dict) else None
        if isinstance(bounding, list) and len(bounding) >= 2:
            origin = (float(bounding[0]), float(bounding[1]))
        return cls(nodes, _links(raw.get("links")), def_id, str(raw.get("name") or def_id or ""), inputs, origin)

    def output_link(self, slot: int) -> _Link | None:
        return next((l for l in self.links.values()
                     if l.target_id == str(SUBGRAPH_OUTPUT_NODE) and l.target_slot == slot), None)


@dataclass
class _Scope:
    """Where a graph is being expanded: the instance chain from the root."""

    graph: _Graph
    path: tuple[str, ...] = ()  # instance node ids from the root
    instance: dict[str, Any] | None = None  # the instance node (in the parent graph)
    parent: "_Scope | None" = None

    def exec_id(self, node_id: str) -> str:
        return ":".join((*self.path, node_id))

    def chain(self) -> list[str]:
        scope, names = self, []
        while scope is not None and scope.graph.id is not None:
            names.append(scope.graph.name)
            scope = scope.parent
        return names[::-1]


#: What an input resolves to: ("link", node id, slot), ("value", v), or None (nothing).
_Resolved = tuple | None


class _Converter:
    def __init__(self, doc: Mapping[str, Any], registry: Registry) -> None:
        self.registry = registry
        defs = (doc.get("definitions") or {}) if isinstance(doc.get("definitions"), dict) else {}
        self.defs: dict[str, _Graph] = {}
        for raw in defs.get("subgraphs") or []:
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                self.defs[raw["id"]] = _Graph.read(raw, raw["id"])
        self.root = _Scope(_Graph.read(doc))
        self.out: dict[str, dict[str, Any]] = {}
        self.children: dict[tuple[str, ...], _Scope] = {}
        self.expanded = 0

    # -- expanding ---------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self._expand(self.root, (0.0, 0.0))
        # Links into nodes that were not emitted (muted branches) would dangle: drop
        # them, as ComfyUI's frontend does before it queues a prompt.
        for entry in self.out.values():
            for name, value in list(entry["inputs"].items()):
                if _is_link(value) and value[0] not in self.out:
                    del entry["inputs"][name]
        return {"version": 1, "nodes": self.out}

    def _child(self, scope: _Scope, node: Mapping[str, Any]) -> _Scope:
        key = (*scope.path, str(node.get("id")))
        if key not in self.children:
            graph = self.defs[node["type"]]
            if graph.id in _ancestor_ids(scope):
                chain = " -> ".join([*scope.chain(), graph.name])
                raise ConversionError(f"subgraph '{graph.name}' ({graph.id}) contains itself: {chain}")
            if len(key) > MAX_SUBGRAPH_DEPTH:
                raise ConversionError(
                    f"subgraphs nest deeper than {MAX_SUBGRAPH_DEPTH} levels at node {':'.join(key)} "
                    f"({' -> '.join([*scope.chain(), graph.name])})")
            self.children[key] = _Scope(graph, key, dict(node), scope)
        return self.children[key]

    def _expand(self, scope: _Scope, offset: tuple[float, float]) -> None:
        for node_id, node in scope.graph.nodes.items():
            self.expanded += 1
            if self.expanded > MAX_EXPANDED_NODES:
                raise ConversionError(f"the workflow expands to more than {MAX_EXPANDED_NODES} nodes "
                                      f"(subgraphs used inside subgraphs many times over)")
            kind, mode = node.get("type"), node.get("mode", 0)
            if mode in (MODE_MUTED, MODE_BYPASS) or kind in IGNORED or kind in REROUTES or kind == LEGACY_PRIMITIVE:
                continue
            if isinstance(kind, str) and kind in self.defs:
                child = self._child(scope, node)
                x, y = _pos(node) or (0.0, 0.0)
                self._expand(child, (offset[0] + x - child.graph.origin[0], offset[1] + y - child.graph.origin[1]))
                continue
            self.out[scope.exec_id(node_id)] = self._emit(scope, node, offset)

    def _emit(self, scope: _Scope, node: Mapping[str, Any], offset: tuple[float, float]) -> dict[str, Any]:
        kind = node.get("type")
        spec = self.registry.get(kind) if isinstance(kind, str) else None
        inputs, controls = widget_inputs(node.get("widgets_values"), spec, node.get("widgets_values_named"))
        for slot in node.get("inputs") or []:
            if not isinstance(slot, dict) or slot.get("link") is None:
                continue
            name = str(slot.get("name"))
            resolved = self._resolve_link(scope, slot["link"], str(slot.get("type", "*")), set())
            if resolved is None:
                continue  # nothing feeds it: the widget's own value (if any) stands
            inputs[name] = [resolved[1], resolved[2]] if resolved[0] == "link" else _wrap(resolved[1])
        entry: dict[str, Any] = {"type": kind if isinstance(kind, str) else None, "inputs": inputs}
        title = node.get("title")
        if isinstance(title, str) and title:
            entry["title"] = title
        ui: dict[str, Any] = {}
        pos = _pos(node)
        if pos is not None:
            ui["pos"] = [round(pos[0] + offset[0], 2), round(pos[1] + offset[1], 2)]
        if controls:
            ui["controls"] = controls
        if ui:
            entry["ui"] = ui
        return entry

    # -- resolving what feeds an input --------------------------------------------

    def _resolve_link(self, scope: _Scope, link_id: Any, wanted: str, seen: set) -> _Resolved:
        try:
            link = scope.graph.links.get(int(link_id))
        except (TypeError, ValueError):
            return None
        return None if link is None else self._follow(scope, link, wanted, seen)

    def _follow(self, scope: _Scope, link: _Link, wanted: str, seen: set) -> _Resolved:
        if link.origin_id == str(SUBGRAPH_INPUT_NODE):
            return self._from_instance_input(scope, link.origin_slot, wanted, seen)
        origin = scope.graph.nodes.get(link.origin_id)
        if origin is None:
            return None
        return self._resolve_output(scope, origin, link.origin_slot, wanted, seen)

    def _from_instance_input(self, scope: _Scope, slot: int, wanted: str, seen: set) -> _Resolved:
        """An inner input fed by the subgraph's input ``slot``: look at the instance outside."""
        if scope.instance is None or scope.parent is None:
            return None
        inst_input = _instance_input(scope.instance, scope.graph.inputs, slot)
        if inst_input is not None and inst_input.get("link") is not None:
            return self._resolve_link(scope.parent, inst_input["link"], wanted, seen)
        if inst_input is not None and "widget" in inst_input:
            value = _promoted_value(scope.instance, inst_input)
            if value is not _MISSING:
                return ("value", value)
        value = _definition_value(scope.instance, scope.graph.inputs, slot)
        if value is not _MISSING:
            return ("value", value)
        if wanted == T.ANY or wanted in T.WIDGET_TYPES:  # a socket that may hold a value (PreviewAny's)
            return self._inner_widget_value(scope, slot)
        return None

    def _inner_widget_value(self, scope: _Scope, slot: int) -> _Resolved:
        """The subgraph's input ``slot`` where the instance neither links nor stores it (newer files
        promote widgets through ``proxyWidgets``, without an instance slot for each): the frontend
        gives every target the value of the inner widget that input feeds, so a socket beside the
        widget (ERNIE's PreviewAny showing the height) gets that value too. None when no widget is fed."""
        for link in scope.graph.links.values():
            if link.origin_id != str(SUBGRAPH_INPUT_NODE) or link.origin_slot != slot:
                continue
            node = scope.graph.nodes.get(link.target_id) or {}
            slots = node.get("inputs") or []
            target = slots[link.target_slot] if 0 <= link.target_slot < len(slots) else None
            if not isinstance(target, dict) or not isinstance(target.get("widget"), dict):
                continue
            kind = node.get("type")
            spec = self.registry.get(kind) if isinstance(kind, str) else None
            values, _ = widget_inputs(node.get("widgets_values"), spec, node.get("widgets_values_named"))
            value = values.get(str(target["widget"].get("name") or target.get("name")), _MISSING)
            if value is not _MISSING and not isinstance(value, (list, dict)):
                return ("value", value)
        return None

    def _resolve_output(self, scope: _Scope, node: Mapping[str, Any], slot: int, wanted: str,
                        seen: set) -> _Resolved:
        key = (scope.path, str(node.get("id")), slot)
        if key in seen:
            raise ConversionError(f"circular connection through node {scope.exec_id(str(node.get('id')))} "
                                  f"({node.get('type')}): links loop through reroutes or bypassed nodes")
        seen.add(key)
        kind, mode = node.get("type"), node.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            index = _bypass_input(node, slot, wanted)
            slots = node.get("inputs") or []
            if index < 0 or slots[index].get("link") is None:
                return None
            return self._resolve_link(scope, slots[index]["link"], wanted, seen)
        if isinstance(kind, str) and kind in self.defs:
            child = self._child(scope, node)
            inner = child.graph.output_link(slot)
            if inner is None:
                return None
            return self._follow(child, inner, wanted, seen)
        if kind in REROUTES:
            slots = node.get("inputs") or []
            if not slots or not isinstance(slots[0], dict) or slots[0].get("link") is None:
                return None
            return self._resolve_link(scope, slots[0]["link"], wanted, seen)
        if kind == LEGACY_PRIMITIVE:
            values = node.get("widgets_values")
            return ("value", values[0]) if isinstance(values, list) and values else None
        if kind in IGNORED:
            return None
        return ("link", scope.exec_id(str(node.get("id"))), slot)


_MISSING = object()


def _ancestor_ids(scope: _Scope) -> list[str]:
    ids = []
    while scope is not None:
        if scope.graph.id is not None:
            ids.append(scope.graph.id)
        scope = scope.parent
    return ids


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _wrap(value: Any) -> Any:
    """A literal list must not read as a link in Kiln's format."""
    return {"__value__": value} if isinstance(value, list) else value


def _pos(node: Mapping[str, Any]) -> tuple[float, float] | None:
    pos = node.get("pos")
    if isinstance(pos, dict):
        pos = [pos.get("0", 0), pos.get("1", 0)]
    if isinstance(pos, (list, tuple)) and len(pos) >= 2:
        try:
            return float(pos[0]), float(pos[1])
        except (TypeError, ValueError):
            return None
    return None


def _instance_input(instance: Mapping[str, Any], def_inputs: list[dict[str, Any]], slot: int) -> dict | None:
    """The instance's input for the definition's input ``slot``: by name, as the frontend rebinds them."""
    slots = [s for s in instance.get("inputs") or [] if isinstance(s, dict)]
    if 0 <= slot < len(def_inputs):
        name = def_inputs[slot].get("name")
        match = next((s for s in slots if s.get("name") == name), None)
        if match is not None:
            return match
    return None


def _promoted_value(instance: Mapping[str, Any], inst_input: Mapping[str, Any]) -> Any:
    """The value an instance stores for a promoted widget, or _MISSING.

    An instance stores one value per promoted input (inputs with a ``widget``), in
    their order; older files add a seed's mode after its value. When the stored list
    does not line up with the promoted inputs, its layout is not one we know, and
    the inner widgets' own values (which the frontend keeps in step) are used.
    """
    values = instance.get("widgets_values")
    if not isinstance(values, list) or not values:
        return _MISSING
    promoted = [s for s in instance.get("inputs") or [] if isinstance(s, dict) and "widget" in s]
    mapping: dict[str, Any] = {}
    queue = list(values)
    for slot in promoted:
        if not queue:
            return _MISSING
        mapping[str(slot.get("name"))] = queue.pop(0)
        if queue and isinstance(queue[0], str) and queue[0] in CONTROL_VALUES:
            queue.pop(0)
    if queue:
        return _MISSING
    return mapping.get(str(inst_input.get("name")), _MISSING)


def _definition_value(instance: Mapping[str, Any], def_inputs: list[dict[str, Any]], slot: int) -> Any:
    """The instance's stored value for the definition's input ``slot`` where the instance stores one
    value per definition input of a widget type, in the definition's order, else _MISSING: either
    every input is of a widget type (ComfyUI's Qwen-Image 2.1 templates: 18 values for 18 inputs,
    fewer of them listed on the instance), or the instance lists only the sockets of the others and
    no widget at all (its Marigold v2 ones: 8 values for the 8 inputs after the picture's socket,
    where the inner post-process widgets all say "depth" and the instances "albedo" and "normals")."""
    values = instance.get("widgets_values")
    widgets = [k for k, d in enumerate(def_inputs) if isinstance(d, dict) and d.get("type") in T.WIDGET_TYPES]
    if not isinstance(values, list) or len(values) != len(widgets) or slot not in widgets:
        return _MISSING
    if len(widgets) < len(def_inputs):
        listed = [s for s in instance.get("inputs") or [] if isinstance(s, dict)]
        sockets = {str(d.get("name")) for k, d in enumerate(def_inputs) if k not in widgets and isinstance(d, dict)}
        if any("widget" in s for s in listed) or {str(s.get("name")) for s in listed} != sockets:
            return _MISSING
    return values[widgets.index(slot)]


def _bypass_input(node: Mapping[str, Any], slot: int, wanted: str) -> int:
    """Which input a bypassed node passes to its output ``slot``: :func:`engine.modes.bypass_index`."""
    inputs = [s if isinstance(s, dict) else {} for s in node.get("inputs") or []]
    outputs = node.get("outputs") or []
    out_type = str(outputs[slot].get("type", "*")) if 0 <= slot < len(outputs) and isinstance(outputs[slot], dict) else "*"
    return bypass_index([str(s.get("type", "*")) for s in inputs], slot, out_type, wanted)


def widget_inputs(values: Any, spec: Any, named: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """A node's widget values as {input: value}, and the seed modes as {input: mode}.

    ``spec`` is the node's declaration; without one (an unknown node type, which
    validation reports) positional values cannot be named and are dropped. Newer
    files also save ``widgets_values_named`` ({widget name: value}, the seed's mode
    under "control_after_generate"): where present it is used, since names cannot
    slip a slot.
    """
    if isinstance(values, dict):  # some custom nodes save their widgets by name
        return {str(k): v for k, v in values.items()}, {}
    if spec is None:
        return {}, {}
    if isinstance(named, dict) and named:
        widgets = [i for i in spec.comfy_input_order() if i.widget]  # sub-inputs too
        inputs = {i.name: _wrap(named[i.name]) for i in widgets if i.name in named}
        mode = named.get("control_after_generate")
        seeds = [i.name for i in spec.widget_order() if i.control_after_generate and i.name in named]
        controls = {seeds[0]: mode} if isinstance(mode, str) and mode in CONTROL_VALUES and len(seeds) == 1 else {}
        return inputs, controls
    if not isinstance(values, list):
        return {}, {}
    order = spec.widget_order()
    extra_slots = len(values) > len(order)
    inputs: dict[str, Any] = {}
    controls: dict[str, str] = {}
    queue = list(values)
    uploads = 0  # upload buttons whose value is still ahead (after their combo: where depends on the frontend)
    while order:
        inp = order.pop(0)
        if uploads and queue and _upload_value(queue[0]) and not _takes(inp, queue[0]):
            queue.pop(0)
            uploads -= 1
        if not queue:
            break
        value = queue.pop(0)
        if inp.dynamic:  # a DynamicCombo: the chosen option's widgets come next
            order[:0] = spec.option_widgets(inp, value)
        if not (value == "" and inp.type == T.COMBO and inp.choices is not None and not callable(inp.choices)
                and "" not in inp.choices):
            # An empty string for a fixed-choice combo is an unset widget: the default stands.
            inputs[inp.name] = _wrap(value)
        if inp.control_after_generate and queue:
            mode = queue[0]
            if isinstance(mode, str) and mode in CONTROL_VALUES:
                controls[inp.name] = queue.pop(0)
            elif isinstance(mode, bool) and extra_slots:  # before the words: true meant randomize
                controls[inp.name] = "randomize" if queue.pop(0) else "fixed"
            elif mode is None and extra_slots:  # a widget not serialized keeps its slot as null
                queue.pop(0)
        if inp.extra.get("image_upload"):
            uploads += 1
    return inputs, controls


def _upload_value(value: Any) -> bool:
    """What an upload button leaves in ``widgets_values``: "image" (or the button itself in some files).
    ComfyUI's current frontend puts it after all of a node's widgets (LoadImageMask: [file, "alpha",
    "image"]), older ones after the required ones; so it is skipped where it stands."""
    return value == "image" or isinstance(value, dict)


def _takes(inp: Any, value: Any) -> bool:
    """Whether ``value`` is a value of ``inp`` rather than an upload button's: only a fixed-choice combo
    listing it can take "image" (a text widget holding exactly that word after an upload is unlikely)."""
    return inp.type == T.COMBO and inp.choices is not None and not callable(inp.choices) and value in inp.choices


def to_kiln(doc: Mapping[str, Any], registry: Registry) -> dict[str, Any]:
    """The Kiln-format document for a ComfyUI editor file; raises ConversionError."""
    if not is_ui_format(doc):
        raise ConversionError("not a ComfyUI editor workflow (no 'nodes' list and 'links')")
    return _Converter(doc, registry).run()
