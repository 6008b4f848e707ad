"""Submitting a job: parse, apply parameters, validate everything, queue durably.

Shared by Kiln's ``POST /api/jobs`` and ComfyUI's ``POST /prompt`` so both refuse
the same workflows for the same reasons. Validation happens before the job is
stored: a queued job was valid when it was accepted (the worker re-validates, since
files can vanish while it waits).
"""
from __future__ import annotations

import sqlite3
from typing import Any, Iterable

from engine.guard import artifacts
from engine.server.state import AppState
from engine.server.store import JobRecord
from engine.validate import INVALID_WORKFLOW, Plan, ValidationError, WorkflowInvalid, validate
from engine.workflow import Workflow, WorkflowFormatError, parse

#: extra_data keys never stored (ComfyUI's SENSITIVE_EXTRA_DATA_KEYS).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class SubmitRefused(Exception):
    """The submission is invalid; carries every problem found."""

    def __init__(self, errors: list[ValidationError], workflow: Workflow | None = None) -> None:
        self.errors = errors
        self.workflow = workflow
        super().__init__("; ".join(str(e) for e in errors))


def _problem(kind: str, message: str, **where: Any) -> ValidationError:
    return ValidationError(kind, message, where.get("node_id"), where.get("node_type"), where.get("input_name"))


def prepare(state: AppState, doc: Any, params: Any = None, outputs: Any = None) -> tuple[Workflow, Plan, dict]:
    """Parse and validate a submission; raises :class:`SubmitRefused` with every problem."""
    if doc is None:
        raise SubmitRefused([_problem("no_prompt", "no workflow given")])
    try:
        workflow = parse(doc, state.registry)
    except WorkflowFormatError as exc:
        raise SubmitRefused([_problem(INVALID_WORKFLOW, str(exc))]) from None
    problems: list[ValidationError] = []
    values: dict[str, Any] = {}
    if params is not None and not isinstance(params, dict):
        problems.append(_problem("invalid_parameter", "'params' must be an object of name -> value"))
    for name, value in (params or {}).items() if isinstance(params, dict) else ():
        if workflow.resolve_param(str(name)) is None:
            known = ", ".join(sorted(workflow.params)) or "none declared"
            problems.append(_problem("unknown_parameter",
                                     f"no parameter '{name}': use a named parameter ({known}) or NODE_ID.INPUT"))
        else:
            values[str(name)] = value
    workflow = workflow.with_overrides(values)
    targets: list[str] | None = None
    if outputs is not None:
        if not isinstance(outputs, list) or not outputs:
            problems.append(_problem("invalid_outputs", "'outputs' must be a non-empty list of node ids"))
        else:
            targets = [str(o) for o in outputs]
    try:
        plan = validate(workflow, state.registry, state.env, targets)
    except WorkflowInvalid as exc:
        raise SubmitRefused(problems + list(exc.errors), workflow) from None
    if problems:
        raise SubmitRefused(problems, workflow)
    # Record coerced values ("0.5" -> 0.5) so history and saved PNGs carry typed values.
    applied: dict[str, Any] = {}
    for name in values:
        for node_id, input_name in workflow.param_fanout.get(name) or [workflow.resolve_param(name)]:
            node = plan.nodes.get(node_id)
            if node is not None and input_name in node.literals:
                workflow.nodes[node_id].inputs[input_name] = node.literals[input_name]
                applied.setdefault(name, node.literals[input_name])
    return workflow, plan, applied


def submit(state: AppState, doc: Any, *, params: Any = None, outputs: Any = None, force: bool = False,
           client_id: str | None = None, job_id: str | None = None, number: float | None = None,
           front: bool = False, extra_data: dict[str, Any] | None = None) -> JobRecord:
    """Validate and durably queue a job; the row is committed when this returns."""
    workflow, plan, applied = prepare(state, doc, params, outputs)
    extra = {k: v for k, v in (extra_data or {}).items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
    if client_id:
        extra["client_id"] = client_id
    try:
        job = state.store.add(workflow=workflow.to_kiln(), prompt=workflow.to_api(), job_id=job_id, number=number,
                              front=front, client_id=client_id or None, source_format=workflow.source_format,
                              params=applied, outputs_to_execute=plan.outputs, force=force, extra_data=extra)
    except sqlite3.IntegrityError:
        raise SubmitRefused([_problem("duplicate_id", f"a job with id '{job_id}' already exists")]) from None
    state.worker.wake()
    return job


# -- views --------------------------------------------------------------------------------

def job_view(state: AppState, job: JobRecord, *, full: bool = True) -> dict[str, Any]:
    """Kiln's job JSON (``GET /api/jobs/{id}``)."""
    error = None
    if job.error:
        error = {k: job.error.get(k) for k in ("node_id", "node_type", "input_name", "message", "traceback")}
        error["exception_type"] = job.error.get("exception_type")
    view: dict[str, Any] = {
        "id": job.id, "status": job.status,
        "progress": state.worker.progress(job.id) if job.status == "running" else None,
        "outputs": job.outputs, "error": error,
        "created": job.created, "started": job.started, "finished": job.finished,
        "client_id": job.client_id, "number": job.comfy_number, "params": job.params,
        "executed": job.executed, "cached": job.cached,
        "artifacts": artifacts(job.outputs or {}),
    }
    if full:
        view["workflow"] = job.workflow
    return view


def dependent_outputs(workflow: Workflow | None, node_ids: Iterable[str], registry: Any) -> dict[str, list[str]]:
    """For each node, the output nodes that need it (ComfyUI's ``dependent_outputs``)."""
    if workflow is None:
        return {}
    import networkx as nx

    graph = workflow.graph()
    outs = [n.id for n in workflow.nodes.values()
            if n.type and (spec := registry.get(n.type)) is not None and spec.output_node]
    result = {}
    for node_id in node_ids:
        if node_id not in graph:
            result[node_id] = []
            continue
        below = nx.descendants(graph, node_id) | {node_id}
        result[node_id] = [o for o in outs if o in below]
    return result
