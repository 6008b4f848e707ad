"""``kiln run``: one workflow in this process, with the Executor the server uses.

stdout carries only results (NDJSON events with ``--json``, else the saved files
when piped), progress and errors go to stderr; Ctrl-C stops the job cooperatively.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from engine.cli.environment import cli_env
from engine.cli.report import EXIT_INTERRUPTED, EXIT_NODE_FAILED, EXIT_OK, emit_json, report_ignored, report_invalid
from engine.cli.workflow_input import UsageProblem, prepare_job
from engine.context import JobInfo
from engine.paths import PathRefused
from engine.registry import default_registry


def cmd_run(args: argparse.Namespace) -> int:
    from engine.executor import Executor

    registry = default_registry()
    temp_dir = tempfile.mkdtemp(prefix="kiln-run-")
    try:
        env = cli_env(args, temp_dir=temp_dir, create_output=True, registry=registry)
        try:
            wf, plan, params = prepare_job(args, env, registry)
        except UsageProblem as exc:
            return report_invalid(exc.errors, args.json)
        report_ignored(plan.ignored)
        # No device is resolved here: asking imports torch, which an image-only workflow never
        # needs; a model loader's prefetch (started by the executor) imports it in the background.

        def locate(image: dict[str, Any]) -> Path | None:
            root = {"output": env.paths.output, "temp": env.paths.temp, "input": env.paths.input}.get(image.get("type"))
            try:
                return root.resolve(image["filename"], image.get("subfolder", "")) if root else None
            except (PathRefused, KeyError):
                return None

        from engine.console import ProgressRenderer

        renderer = ProgressRenderer(sys.stderr, live=sys.stderr.isatty() and not args.json, locate=locate,
                                    errors_only=args.json)

        def on_event(event: Any) -> None:
            if args.json:
                emit_json(sys.stdout, event.to_dict())
            renderer(event)

        # The console shows no images and --json carries none: no node makes previews.
        job = JobInfo(id=uuid.uuid4().hex, workflow=plan.api_prompt(), kiln_workflow=wf.to_kiln(), params=params,
                      previews=False)
        interrupt = threading.Event()
        with _sigint_sets(interrupt):
            try:
                outcome = Executor(registry, env).run(plan, job=job, force=args.force, on_event=on_event,
                                                      interrupt=interrupt, keep_going=args.keep_going)
            except KeyboardInterrupt:
                sys.stderr.write("aborted\n")
                return EXIT_INTERRUPTED
        if not args.json and outcome.status != "interrupted" and not sys.stdout.isatty():
            for path in renderer.files:  # scripts piping stdout get the saved files, one per line
                sys.stdout.write(f"{path}\n")
        return {"succeeded": EXIT_OK, "failed": EXIT_NODE_FAILED}.get(outcome.status, EXIT_INTERRUPTED)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


class _sigint_sets:
    """Ctrl-C sets the job's interrupt event (the executor stops cooperatively); a second one aborts."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        sys.stderr.write("\ninterrupting... (Ctrl-C again to abort at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "_sigint_sets":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

