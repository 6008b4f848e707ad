"""Whether a job's live previews go out on the websocket: ComfyUI's rule, in one place.

ComfyUI sends no preview frames unless it was started with ``--preview-method``
(default ``none``), and since late 2025 a prompt may override that for itself
with ``extra_data.preview_method`` (``"default"`` meaning the server's setting).
Clients written against ComfyUI rely on this: comfy-api-simplified, for one,
takes the first binary frame it sees as the job's image, so a preview it never
asked for replaces the result. Kiln follows the same rule for both websocket
protocols; Kiln's own editor asks for previews in each job it submits.

Kiln has one preview decoder (a per-family linear latent-to-RGB projection), so
``auto``, ``latent2rgb`` and ``taesd`` all mean "previews on"; ComfyUI's
``taesd`` also falls back to latent2rgb when its small decoder is missing.
"""
from __future__ import annotations

from typing import Any, Mapping

#: ComfyUI's ``--preview-method`` choices (comfy/cli_args.py LatentPreviewMethod).
PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
DEFAULT_METHOD = "none"


def check_method(method: str) -> str:
    """A valid server-wide method, or ValueError naming the choices."""
    if method not in PREVIEW_METHODS:
        raise ValueError(f"preview method must be one of {', '.join(PREVIEW_METHODS)}, not {method!r}")
    return method


def job_method(server_method: str, extra_data: Mapping[str, Any] | None) -> str:
    """The method in force for one job: its own ``preview_method``, else the server's."""
    asked = (extra_data or {}).get("preview_method")
    if isinstance(asked, str) and asked in PREVIEW_METHODS:
        return asked
    return server_method  # absent, "default" or unknown: the server decides, as in ComfyUI


def previews_enabled(server_method: str, extra_data: Mapping[str, Any] | None) -> bool:
    """True when this job's progress events may carry preview images to its client."""
    return job_method(server_method, extra_data) != "none"
