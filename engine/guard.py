"""The output guard: the one gate every image passes before it leaves a job.

An operator may require that no image leaves the server unchecked, whatever graph
a client submits (Stability's API classifies every result and blurs what its
classifier flags). The engine cannot judge pixels (it does not know torch), so
the node library provides the guard through a factory it registers
(:attr:`engine.registry.Registry.output_guard_factory`) and the server installs
it as ``env.output_guard``. Two places then consult it, each the single point
through which its kind of image leaves:

* the node library's image writer (SaveImage, PreviewImage and any node that
  saves through it) checks whole batches before a byte is written, and stamps
  each reported image with ``filtered``;
* the executor checks every sampler preview before it becomes an event, so a
  preview the guard withholds is never sent to any client.

This module also holds the one rule that turns a per-image result into the
finish reason Kiln's job API reports, named as Stability's API names it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol

#: Stability's finish reasons: a result the filter changed or withheld is FILTER.
SUCCESS, FILTER = "SUCCESS", "FILTER"


class GuardRefused(Exception):
    """The guard cannot be set up as asked (unknown mode, missing or foreign checker file).

    The server refuses to start with it rather than run unguarded.
    """


class OutputGuard(Protocol):
    """What the engine and the image writer ask of an installed guard."""

    #: What happens to a flagged image: "flag" (reported only), "blur", "black" or "drop".
    mode: str

    def describe(self) -> dict[str, Any]:
        """JSON-able settings for reports (mode, checker name)."""
        ...

    def check_images(self, images: Any) -> Any:
        """Classify a batch of IMAGE values and apply the mode (the node library's types)."""
        ...

    def check_preview(self, preview: Any) -> Any:
        """A :class:`engine.events.Preview` to send in place of ``preview``, or None to send none."""
        ...


def finish_reason(image: Mapping[str, Any]) -> str:
    """FILTER for an image the guard flagged (changed or dropped), else SUCCESS."""
    return FILTER if image.get("filtered") else SUCCESS


def artifacts(outputs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every image a job reported, each with ``filtered`` and its finish reason.

    Images follow ComfyUI's convention (``ui["images"]`` entries with filename,
    subfolder, type); images the guard dropped are listed under ``ui["dropped"]``
    and appear here without a file.
    """
    found: list[dict[str, Any]] = []
    for node_id, ui in outputs.items():
        if not isinstance(ui, Mapping):
            continue
        for entry in _entries(ui.get("images")):
            found.append({"node_id": node_id, "filename": entry.get("filename"),
                          "subfolder": entry.get("subfolder", ""), "type": entry.get("type"),
                          "filtered": bool(entry.get("filtered")), "finish_reason": finish_reason(entry)})
        for entry in _entries(ui.get("dropped")):
            found.append({"node_id": node_id, "filename": None, "subfolder": None, "type": None,
                          "index": entry.get("index"), "filtered": True, "finish_reason": FILTER})
    return found


def unchecked_images(ui: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The images a node reported that did not pass the guard (they carry no ``filtered``).

    Kiln's image writer stamps every image it saves while a guard is on; an image
    without the stamp was written some other way (a third-party node with its own
    writer), so the executor withholds it rather than let it out unchecked.
    """
    return [e for e in _entries(ui.get("images")) if "filtered" not in e]


def _entries(value: Any) -> Iterable[Mapping[str, Any]]:
    return [e for e in value if isinstance(e, Mapping)] if isinstance(value, list) else []
