"""One submission path for every front door: parse, apply parameters, validate, record.

``kiln run``/``kiln validate``, ``POST /api/jobs`` and ComfyUI's ``POST /prompt``
all turn what they were given into a plan here, so a workflow that one accepts
the others accept, for the same reasons, and every refusal has the one problem
shape (:class:`~engine.validate.ValidationError`). What differs stays at the
door: the CLI reads ``--set NAME=VALUE`` text, the server reads JSON bodies.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Mapping, Sequence

from engine.registry import Registry
from engine.validate import INVALID_WORKFLOW, Plan, ValidationError, WorkflowInvalid, still_valid, validate
from engine.formats import parse_document
from engine.workflow import Workflow, WorkflowFormatError

#: The deepest JSON a submission may nest. Real workflows stay under ten levels;
#: Python's own parsers and encoders fail somewhere near a thousand, so a limit far
#: below that keeps every later step (copying, storing, hashing) safe.
MAX_JSON_DEPTH = 64


#: How many recently accepted documents (without parameters) are remembered with their plan, and
#: the longest (as JSON text) that is: an identical resubmission then re-runs only the checks
#: that read the environment (engine.validate.still_valid), not the whole validation.
RECENT_PLANS = 64
RECENT_MAX_CHARS = 1 << 18


class _RecentPlans:
    """Plans of recently accepted documents, by the document's canonical JSON (and the outputs asked for)."""

    def __init__(self) -> None:
        self._plans: OrderedDict[str, tuple[Workflow, Plan]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(doc: Any, outputs: Any) -> str | None:
        try:
            key = json.dumps([doc, outputs], sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):  # not plain JSON: not remembered
            return None
        return key if len(key) <= RECENT_MAX_CHARS else None

    def get(self, key: str) -> tuple[Workflow, Plan] | None:
        with self._lock:
            found = self._plans.get(key)
            if found is not None:
                self._plans.move_to_end(key)
            return found

    def put(self, key: str, workflow: Workflow, plan: Plan) -> None:
        with self._lock:
            self._plans[key] = (workflow, plan)
            self._plans.move_to_end(key)
            while len(self._plans) > RECENT_PLANS:
                self._plans.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._plans.pop(key, None)


_recent = _RecentPlans()


class SubmissionInvalid(Exception):
    """The submission is invalid; carries every problem found (and the workflow, if it parsed)."""

    def __init__(self, errors: list[ValidationError], workflow: Workflow | None = None) -> None:
        self.errors = errors
        self.workflow = workflow
        super().__init__("; ".join(str(e) for e in errors))


def problem(kind: str, message: str, *, node_id: str | None = None, node_type: str | None = None,
            input_name: str | None = None) -> ValidationError:
    """A problem found outside the graph check (a bad parameter name, a malformed body)."""
    return ValidationError(kind, message, node_id, node_type, input_name)


def json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why a decoded JSON value cannot be accepted, or None.

    Two things break later steps while looking like ordinary JSON: nesting deep
    enough to exhaust the recursion of copying and encoding, and a lone UTF-16
    surrogate (``"\\ud800"``), which is valid JSON but no valid text, so writing it
    to a file name, a PNG chunk or SQLite fails. Walked without recursion.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if depth > max_depth:
            return f"the JSON nests deeper than {max_depth} levels (at {where or 'the top'})"
        if isinstance(item, str):
            if _has_surrogate(item):
                return f"{where or 'a string'} contains a lone UTF-16 surrogate, which is not valid text"
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _has_surrogate(key):
                    return "a key contains a lone UTF-16 surrogate, which is not valid text"
                stack.append((child, depth + 1, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((child, depth + 1, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def prepare(doc: Any, registry: Registry, env: Any, params: Mapping[str, Any] | None = None,
            outputs: Sequence[Any] | None = None, *, problems: Sequence[ValidationError] = ()) -> tuple[
                Workflow, Plan, dict[str, Any]]:
    """Parse (unless given a Workflow), apply ``params``, validate; the workflow, plan and recorded values.

    ``problems`` are ones the caller already found (a malformed ``--set``); they are
    reported together with the workflow's own. Raises :class:`SubmissionInvalid`
    with every problem at once.
    """
    errors = list(problems)
    # An identical document seen lately (the same JSON, no parameters, no problems found by the
    # caller) parsed and validated to a plan that is read-only from then on: the same registry,
    # folders and settings give it again, so only what reads the environment (files, computed
    # choices, the budget) is checked again. Any failure there validates from the start below,
    # which names the node and the input as always.
    key = _recent.key(doc, outputs) if not errors and not params and not isinstance(doc, Workflow) else None
    if key is not None:
        found = _recent.get(key)
        if found is not None:
            if still_valid(found[1], registry, env):
                return found[0], found[1], {}
            _recent.drop(key)
    if isinstance(doc, Workflow):
        workflow = doc
    else:
        if doc is None:
            raise SubmissionInvalid(errors + [problem("no_prompt", "no workflow given")])
        trouble = json_problem(doc)
        if trouble:
            raise SubmissionInvalid(errors + [problem(INVALID_WORKFLOW, trouble)])
        try:
            workflow = parse_document(doc, registry)
        except WorkflowFormatError as exc:
            raise SubmissionInvalid(errors + [problem(INVALID_WORKFLOW, str(exc))]) from None
    values: dict[str, Any] = {}
    if params is not None and not isinstance(params, Mapping):
        errors.append(problem("invalid_parameter", "'params' must be an object of name -> value"))
        params = None
    trouble = json_problem(dict(params)) if params else None
    if trouble:
        errors.append(problem("invalid_parameter", f"params: {trouble}"))
        params = None
    for name, value in (params or {}).items():
        name = str(name)
        target = workflow.resolve_param(name)
        if target is None:
            known = ", ".join(sorted(workflow.params)) or "none declared"
            errors.append(problem("unknown_parameter",
                                  f"no parameter '{name}': use a named parameter ({known}) or NODE_ID.INPUT"))
            continue
        node = workflow.nodes[target[0]]
        spec = registry.get(node.type) if node.type else None
        if spec is not None and spec.input(target[1]) is None:
            names = ", ".join(i.name for i in spec.inputs)
            errors.append(problem("unknown_parameter", f"parameter '{name}': node {node.id} ({spec.type}) has no "
                                                       f"input '{target[1]}' (its inputs: {names})",
                                  node_id=node.id, node_type=spec.type, input_name=target[1]))
            continue
        values[name] = value
    if values:  # a copy only when something is set (deep-copying a workflow is most of a small one's parse)
        workflow = workflow.with_overrides(values)
    targets: list[str] | None = None
    if outputs is not None:
        if not isinstance(outputs, (list, tuple)) or not outputs:
            errors.append(problem("invalid_outputs", "'outputs' must be a non-empty list of node ids"))
        else:
            targets = [str(o) for o in outputs]
    try:
        plan = validate(workflow, registry, env, targets)
    except WorkflowInvalid as exc:
        raise SubmissionInvalid(errors + list(exc.errors), workflow) from None
    if errors:
        raise SubmissionInvalid(errors, workflow)
    if key is not None and not values:
        _recent.put(key, workflow, plan)
    # History and saved PNGs carry what the nodes received ("0.5" -> 0.5).
    return workflow, plan, plan.record_params(values)
