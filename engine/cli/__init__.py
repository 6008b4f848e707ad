"""The `kiln` command: run | validate | nodes | serve | worker.

``kiln run`` executes a workflow in this process with the same Executor the
server uses, so a workflow behaves identically headless and behind the API. It is
made for scripts: stdout carries only results (NDJSON events with ``--json``),
progress and errors go to stderr, and the exit code says what happened:

    0  the job succeeded
    1  a node failed (its id, type, input and message are printed)
    2  the workflow (or a --set value) is invalid; every problem is printed
    130 interrupted (Ctrl-C: the job stops at the next node or sampler step)

One module per job: ``options`` (the parser), ``environment`` (folders and settings),
``workflow_input`` (the file and ``--set``), ``report`` (exit codes and output), and the
commands in ``run``, ``inspect_commands`` (validate, nodes) and ``serve`` (serve, worker).
"""
from __future__ import annotations

import sys
from typing import Sequence

from engine.cli.environment import cli_env, compile_from_args, limits_from_args
from engine.cli.inspect_commands import cmd_nodes, cmd_validate
from engine.cli.options import build_parser
from engine.cli.report import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_NODE_FAILED, EXIT_OK
from engine.cli.run import cmd_run
from engine.cli.serve import cmd_serve, cmd_worker, devices_from
from engine.context import default_data_dir

_devices = devices_from  # the name tests and older callers import

__all__ = ["EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_NODE_FAILED", "EXIT_OK", "build_parser", "cli_env", "cmd_nodes",
           "cmd_run", "cmd_serve", "cmd_validate", "cmd_worker", "compile_from_args", "devices_from",
           "limits_from_args", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kiln`` entry point; the exit code is the command's (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "lean_memory", False):  # serve, run, worker: the processes that run jobs
        from engine.allocator import return_large_frees

        return_large_frees()
    if args.command == "serve" and args.data is None:
        args.data = str(default_data_dir())
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `kiln run --json ... | head`
        return EXIT_OK

