"""Any workflow document to a :class:`~engine.workflow.Workflow`: the one entry every front door uses.

Kiln's format and ComfyUI's API format need nothing but the document
(:func:`engine.workflow.parse`); ComfyUI's editor (UI) format stores widget values
by position, so converting it needs the node declarations (:mod:`engine.workflow_ui`).
This module sits above both, so neither imports the other's caller.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.registry import Registry
from engine.workflow import Workflow, WorkflowFormatError, decode, parse
from engine.workflow_ui import ConversionError, is_ui_format, to_kiln


def parse_document(doc: Any, registry: Registry | None = None) -> Workflow:
    """Parse a Kiln, ComfyUI API or (with a registry) ComfyUI editor document.

    With a registry, a workflow in either ComfyUI format gets ComfyUI's defaults
    where they differ from Kiln's (SaveImage's "ComfyUI" prefix).
    """
    doc = decode(doc)
    if is_ui_format(doc):
        if registry is None:
            raise WorkflowFormatError(
                "this is a ComfyUI editor (UI-format) workflow; converting it needs the node declarations "
                "(pass the registry)")
        try:
            converted = to_kiln(doc, registry)
        except ConversionError as exc:  # a subgraph cycle, nesting or expansion too deep: the file's fault
            raise WorkflowFormatError(str(exc)) from exc
        workflow = parse(converted)
        workflow.source_format = "comfyui-ui"
    else:
        workflow = parse(doc)
    if registry is not None and workflow.source_format != "kiln":
        fill_comfy_defaults(workflow, registry)
    return workflow


def fill_comfy_defaults(workflow: Workflow, registry: Registry) -> None:
    """Write ComfyUI's default into every input a ComfyUI-format workflow left out.

    Written into the workflow (not applied at validation) because a job is stored
    and re-run in Kiln's format, which must keep meaning what the client sent.
    """
    from engine.node import NO_DEFAULT

    for node in workflow.nodes.values():
        spec = registry.get(node.type) if node.type else None
        for inp in spec.inputs if spec is not None else ():
            if inp.comfy_default is not NO_DEFAULT and inp.name not in node.inputs:
                node.inputs[inp.name] = inp.comfy_default


def load_document(path: str | Path, registry: Registry | None = None) -> Workflow:
    return parse_document(Path(path).read_text(encoding="utf-8"), registry)
