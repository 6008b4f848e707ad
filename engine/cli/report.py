"""What the commands print: exit codes, NDJSON lines and the list of a workflow's problems.

Scripts read the exit code and stdout; people read stderr. Keeping the three
together keeps every command's answer to a bad workflow the same.
"""
from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from engine.validate import ValidationError

EXIT_OK, EXIT_NODE_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def emit_json(stream: TextIO, payload: dict[str, Any]) -> None:
    stream.write(json.dumps(payload, default=str) + "\n")
    stream.flush()


def report_ignored(errors: list[ValidationError]) -> None:
    """Problems of nodes no output needs: the run goes on without those nodes, and the console says so."""
    for e in errors:
        sys.stderr.write(f"note: not run, no output needs it: [{e.type}] {e}\n")


def report_invalid(errors: list[ValidationError], as_json: bool) -> int:
    sys.stderr.write(f"invalid workflow: {len(errors)} problem(s)\n")
    for e in errors:
        sys.stderr.write(f"  - [{e.type}] {e}\n")
    if as_json:
        emit_json(sys.stdout, {"type": "validation_failed", "errors": [e.to_dict() for e in errors]})
    return EXIT_INVALID

