"""What `kiln run` shows while a job runs: a line per node and a step bar.

A small renderer of the engine's event stream, written to stderr so that stdout
stays free for results (and for NDJSON with ``--json``). On a terminal the bar
redraws in place (``\\r``); in a log file only finished lines are written, so CI
logs stay readable. ASCII only: every console can print it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, TextIO

from engine.events import Event

BAR_WIDTH = 28
#: Redraw the bar at most this often; a sampler can tick faster than a terminal likes.
MIN_REDRAW_S = 0.05


def bar(value: int, maximum: int, width: int = BAR_WIDTH) -> str:
    """``[=======>      ]  12/30``"""
    maximum = max(1, maximum)
    value = max(0, min(value, maximum))
    filled = int(width * value / maximum)
    body = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
    return f"[{body[:width]}] {value:>{len(str(maximum))}}/{maximum}"


class ProgressRenderer:
    """Call it with each event of a job."""

    def __init__(self, stream: TextIO, live: bool, locate: Callable[[dict[str, Any]], Path | None],
                 errors_only: bool = False) -> None:
        self.stream = stream
        self.live = live
        #: With ``--json`` stdout carries the events; stderr then only says what went wrong.
        self.errors_only = errors_only
        self.locate = locate
        self.index = 0
        self.head = ""
        self.bar_shown = False
        self.last_draw = 0.0
        self.files: list[Path] = []
        self.failures_shown = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _end_bar(self) -> None:
        if self.bar_shown:
            self._write("\r\x1b[2K")
            self.bar_shown = False

    def __call__(self, event: Event) -> None:
        if self.errors_only and event.type not in ("node_failed", "job_failed", "job_interrupted"):
            return
        handler = getattr(self, "_on_" + event.type, None)
        if handler is not None:
            handler(event)

    def _on_nodes_cached(self, e: Any) -> None:
        if e.node_ids:
            self._write(f"cached: {len(e.node_ids)} node(s) ({', '.join(e.node_ids)})\n")

    def _on_node_started(self, e: Any) -> None:
        self.index += 1
        self.head = f"[{self.index}] {e.node_type} #{e.node_id}"
        if self.live:
            self._write(f"\r\x1b[2K{self.head} ...")
            self.bar_shown = True

    def _on_progress(self, e: Any) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if e.value < e.max and now - self.last_draw < MIN_REDRAW_S:
            return
        self.last_draw = now
        self._write(f"\r\x1b[2K{self.head} {bar(e.value, e.max)}")
        self.bar_shown = True

    def _on_node_message(self, e: Any) -> None:
        self._end_bar()
        self._write(f"    {e.node_type} #{e.node_id}: {e.message}\n")
        if self.live and self.head:
            self._write(f"{self.head} ...")
            self.bar_shown = True

    def _on_node_finished(self, e: Any) -> None:
        self._end_bar()
        if e.cached:
            line = f"    {e.node_type} #{e.node_id} (cached)"
        else:
            line = f"{self.head or e.node_type} done in {e.seconds:.2f}s"
        self._write(line + "\n")
        for image in (e.ui or {}).get("images", []):
            path = self.locate(image)
            if path is not None:
                self.files.append(path)
                self._write(f"    -> {path}\n")

    def _on_job_finished(self, e: Any) -> None:
        self._end_bar()
        self._write(f"finished in {e.seconds:.2f}s: {len(e.executed)} node(s) ran, {len(e.cached)} cached\n")

    def _on_node_failed(self, e: Any) -> None:
        self.failures_shown += 1
        self._failure(e)
        if e.blocked:
            self._write(f"    skipped, as they need its result: {', '.join(e.blocked)}\n")

    def _on_job_failed(self, e: Any) -> None:
        if self.failures_shown:  # the job kept going: each failure was shown as it happened
            self._end_bar()
            self._write(f"failed: {len(e.failures)} node(s) failed, {len(e.blocked)} skipped, "
                        f"{len(e.executed)} ran\n")
        else:
            self._failure(e)

    def _failure(self, e: Any) -> None:
        self._end_bar()
        where = f"node {e.node_id} ({e.node_type})"
        if e.input_name:
            where += f", input '{e.input_name}'"
        self._write(f"error: {where}: {e.message}\n")
        if e.exception_type and e.exception_type != "NodeError" and e.traceback:
            self._write("".join(e.traceback))

    def _on_job_interrupted(self, e: Any) -> None:
        self._end_bar()
        self._write(f"interrupted at node {e.node_id} ({e.node_type})\n")
