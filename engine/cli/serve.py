"""``kiln serve`` and ``kiln worker``: the long-running processes (the server, a cluster's workers).

Both import their server modules only when started, so an installation without
the server's dependencies still runs ``kiln run``.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys

from engine.cli.environment import compile_from_args, limits_from_args
from engine.cli.report import EXIT_INVALID, EXIT_NODE_FAILED, EXIT_OK
from engine.context import Settings
from engine.registry import Registry, default_registry


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from engine.server.app import run_server
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("engine.server"):
            sys.stderr.write("error: the server is not available in this installation\n")
            return EXIT_NODE_FAILED
        raise
    safety = None
    if args.safety_filter is not None or args.safety_checker is not None:
        if args.safety_filter is None:
            sys.stderr.write("error: --safety-checker needs --safety-filter MODE (flag, blur, black or drop)\n")
            return EXIT_INVALID
        safety = (args.safety_filter, args.safety_checker or "")
    run_server(host=args.host, port=args.port, data_dir=args.data, models_dir=args.models,
               workflows_dir=args.workflows, token=args.token, allow_url_images=args.allow_url_images,
               safety=safety, env_settings=compile_from_args(args, limits_from_args(args, Settings())),
               debug=args.debug,
               move_damaged_db=args.move_damaged_db, devices=devices_from(args.devices), cluster=args.cluster,
               cluster_timeout=args.cluster_timeout, max_attempts=args.max_attempts,
               preview_method=args.preview_method, frontend=args.frontend, batch_jobs=args.batch_jobs,
               warm_up=args.warm_up)
    end_process(EXIT_OK)
    return EXIT_OK  # not reached


def end_process(code: int) -> None:
    """End ``kiln serve`` once the server has stopped (its jobs stored, its store closed, its worker
    threads joined): run the exit handlers (logging's flush, weakref finalisers such as an offload
    folder's removal), flush the standard streams, and leave without the interpreter's own teardown.
    After a job has loaded torch and diffusers that teardown is a garbage collection over every
    imported object: seconds (about 5 s on a 2-core machine) between Ctrl+C or SIGTERM and the exit,
    with nothing left for it to clean up."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def devices_from(text: str | None) -> list[str] | None:
    """``cuda:0,cuda:1`` -> a list; None (every visible GPU, or the CPU) when not given."""
    if not text:
        return None
    return [d.strip() for d in text.split(",") if d.strip()] or None


def cmd_worker(args: argparse.Namespace, registry: Registry | None = None) -> int:
    """Join a Dask cluster as Kiln workers, one per device, until stopped."""
    import asyncio
    import logging

    try:
        from engine.server import cluster_worker
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"error: kiln worker needs Dask distributed ({exc.name} is not installed)\n")
        return EXIT_NODE_FAILED
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = registry or default_registry()
    devices: list[str | None] = list(devices_from(args.devices) or [None])
    try:
        asyncio.run(cluster_worker.serve(args.scheduler, registry, devices, args.data, args.models, name=args.name,
                                         host=args.listen, timeout=args.timeout))
    except (OSError, cluster_worker.VersionRefused) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_INVALID
    return EXIT_OK

