"""A workflow file and the ``--set`` / ``--image`` values, through the shared submission path.

``kiln run`` and ``kiln validate`` read their workflow the same way the server does
(engine.submission), so the problems they report are the server's, all at once.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from engine import types as T
from engine.context import Environment
from engine.formats import parse_document
from engine.registry import Registry
from engine.submission import MAX_JSON_DEPTH, SubmissionInvalid, json_problem, prepare, problem
from engine.validate import ValidationError
from engine.workflow import Workflow, WorkflowFormatError


class UsageProblem(Exception):
    """Something wrong with what the user asked for (file, --set, the workflow): every problem found."""

    def __init__(self, errors: list[ValidationError]) -> None:
        self.errors = errors
        super().__init__("; ".join(e.message for e in errors))


def _parse_value(raw: str, input_type: str | None) -> Any:
    """--set values stay strings (validation coerces them by the schema), except JSON lists/objects.

    Text inputs (STRING, COMBO) always keep the string, so a prompt that happens
    to start with '[' is not turned into a list.
    """
    if input_type in (T.STRING, T.COMBO):
        return raw
    stripped = raw.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
    return raw


def _read_sets(wf: Workflow, registry: Registry, sets: Sequence[str],
               image: str | None) -> tuple[dict[str, Any], list[ValidationError]]:
    """The --set / --image values as parameters (typed where the target input is known), and the problems.

    Names are judged by the shared submission path, so an unknown one is reported
    with every other problem of the command line and the workflow.
    """
    problems: list[ValidationError] = []
    raw: dict[str, str] = {}
    for item in sets:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            problems.append(problem("invalid_parameter", f"--set '{item}' is not NAME=VALUE"))
            continue
        raw[name.strip()] = value
    if image is not None:
        loaders = sorted((n for n in wf.nodes.values() if n.type and registry.get(n.type) is not None
                          and registry.get(n.type).type == "LoadImage"), key=lambda n: _id_key(n.id))
        if not loaders:
            problems.append(problem("invalid_parameter", "--image given but the workflow has no LoadImage node"))
        else:
            raw.setdefault(f"{loaders[0].id}.image", image)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        target = wf.resolve_param(name)
        node = wf.nodes[target[0]] if target else None
        spec = registry.get(node.type) if node is not None and node.type else None
        inp = spec.input(target[1]) if spec is not None and target else None
        values[name] = _parse_value(value, inp.type if inp else None)
    return values, problems


def _id_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _load(path: str, registry: Registry) -> Workflow:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageProblem([problem("invalid_workflow", f"no such workflow file: {path}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageProblem([problem("invalid_workflow", f"cannot read {path}: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise UsageProblem([problem("invalid_workflow", f"{path}: not valid JSON: {exc}")]) from None
    except RecursionError:
        raise UsageProblem([problem("invalid_workflow", f"{path}: the JSON nests deeper than "
                                                        f"{MAX_JSON_DEPTH} levels")]) from None
    trouble = json_problem(doc)
    if trouble:
        raise UsageProblem([problem("invalid_workflow", f"{path}: {trouble}")])
    try:
        return parse_document(doc, registry)
    except WorkflowFormatError as exc:
        raise UsageProblem([problem("invalid_workflow", f"{path}: {exc}")]) from None


def prepare_job(args: argparse.Namespace, env: Environment, registry: Registry) -> tuple[Workflow, Any, dict]:
    """Load, read --set, and go through the shared submission path; UsageProblem carries every problem."""
    wf = _load(args.workflow, registry)
    values, problems = _read_sets(wf, registry, args.set or [], getattr(args, "image", None))
    try:
        return prepare(wf, registry, env, values, problems=problems)
    except SubmissionInvalid as exc:
        raise UsageProblem(exc.errors) from None

