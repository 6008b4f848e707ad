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
    """Parse a Kiln, ComfyUI API or (with a registry) ComfyUI editor document."""
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
        return workflow
    return parse(doc)


def load_document(path: str | Path, registry: Registry | None = None) -> Workflow:
    return parse_document(Path(path).read_text(encoding="utf-8"), registry)
