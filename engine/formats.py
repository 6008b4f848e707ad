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
from engine.workflow_ui import from_comfy_ui, is_ui_format


def parse_document(doc: Any, registry: Registry | None = None) -> Workflow:
    """Parse a Kiln, ComfyUI API or (with a registry) ComfyUI editor document."""
    doc = decode(doc)
    if is_ui_format(doc):
        if registry is None:
            raise WorkflowFormatError(
                "this is a ComfyUI editor (UI-format) workflow; export it with 'Save (API Format)' "
                "or open it in Kiln's editor, which converts it")
        return from_comfy_ui(doc, registry)
    return parse(doc)


def load_document(path: str | Path, registry: Registry | None = None) -> Workflow:
    return parse_document(Path(path).read_text(encoding="utf-8"), registry)
