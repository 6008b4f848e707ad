"""Kiln events as ComfyUI websocket messages (``{"type", "data"}``) and binary frames.

The executor emits one typed event stream; ComfyUI clients expect the message
names and payloads of ComfyUI's ``execution.py``/``main.py``. This module is the
single translation, used both for the websocket and for ``status.messages`` in
history, so the two can never disagree.
"""
from __future__ import annotations

import io
import struct
from typing import Any

from engine.events import (Event, JobFailed, JobFinished, JobInterrupted, JobStarted, NodeFinished, NodesCached,
                           NodeStarted, Preview, Progress)

#: ComfyUI's binary event types (protocol.py BinaryEventTypes).
PREVIEW_IMAGE = 1
TEXT = 3
_IMAGE_TYPES = {"image/jpeg": 1, "image/png": 2}

#: The messages ComfyUI keeps in history ``status.messages``.
HISTORY_MESSAGES = {"execution_start", "execution_cached", "execution_success", "execution_error",
                    "execution_interrupted"}


def to_comfy(event: Event, current_inputs: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The ComfyUI messages one event becomes (possibly none, possibly two)."""
    pid = event.job_id
    if isinstance(event, JobStarted):
        return [("execution_start", {"prompt_id": pid, "timestamp": event.timestamp})]
    if isinstance(event, NodesCached):
        return [("execution_cached", {"nodes": list(event.node_ids), "prompt_id": pid, "timestamp": event.timestamp})]
    if isinstance(event, NodeStarted):
        return [("executing", {"node": event.node_id, "display_node": event.node_id, "prompt_id": pid})]
    if isinstance(event, Progress):
        return [("progress", {"value": event.value, "max": event.max, "prompt_id": pid, "node": event.node_id})]
    if isinstance(event, NodeFinished):
        if not event.ui:
            return []
        return [("executed", {"node": event.node_id, "display_node": event.node_id, "output": event.ui,
                              "prompt_id": pid})]
    if isinstance(event, JobFinished):
        return [("execution_success", {"prompt_id": pid, "timestamp": event.timestamp}),
                ("executing", {"node": None, "prompt_id": pid})]
    if isinstance(event, JobFailed):
        return [("execution_error", {
            "prompt_id": pid, "node_id": event.node_id, "node_type": event.node_type,
            "executed": list(event.executed), "exception_message": event.message,
            "exception_type": event.exception_type, "traceback": list(event.traceback),
            "current_inputs": current_inputs or {}, "current_outputs": [], "timestamp": event.timestamp}),
            ("executing", {"node": None, "prompt_id": pid})]
    if isinstance(event, JobInterrupted):
        return [("execution_interrupted", {"prompt_id": pid, "node_id": event.node_id, "node_type": event.node_type,
                                           "executed": list(event.executed), "timestamp": event.timestamp}),
                ("executing", {"node": None, "prompt_id": pid})]
    return []


def _as_jpeg_or_png(preview: Preview) -> tuple[int, bytes]:
    kind = _IMAGE_TYPES.get(preview.mime)
    if kind is not None:
        return kind, preview.data
    from PIL import Image  # an unusual format (webp): re-encode once, ComfyUI knows only JPEG/PNG

    with Image.open(io.BytesIO(preview.data)) as im:
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=90)
    return 1, out.getvalue()


def preview_frame(preview: Preview) -> bytes:
    """ComfyUI's PREVIEW_IMAGE binary frame: [type 1][image type][image bytes], big-endian."""
    kind, data = _as_jpeg_or_png(preview)
    return struct.pack(">II", PREVIEW_IMAGE, kind) + data


def text_frame(node_id: str, text: str) -> bytes:
    """ComfyUI's TEXT (progress_text) binary frame."""
    nid = node_id.encode()
    return struct.pack(">II", TEXT, len(nid)) + nid + text.encode()
