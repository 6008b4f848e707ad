"""The folders and settings a command runs with, from its options.

``limits_from_args`` and ``compile_from_args`` are shared with ``kiln serve``, which
passes the settings on to the server instead of building an environment here.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from engine.context import Environment, Paths, Settings, build_env
from engine.paths import SafeRoot
from engine.registry import Registry


def cli_env(args: argparse.Namespace, *, temp_dir: str | None = None, create_output: bool = False,
            registry: Registry | None = None) -> Environment:
    """The CLI's folders and settings, through the one :func:`engine.context.build_env`."""
    paths = Paths(
        input=SafeRoot(args.input_dir),
        output=SafeRoot(args.output_dir, create=create_output),
        temp=SafeRoot(temp_dir or tempfile.gettempdir(), create=True),
        models=SafeRoot(args.models),
        workflows=SafeRoot(getattr(args, "workflows", None) or "workflows"),
    )
    # The CLI is run by the owner of the files and URLs it names.
    settings = limits_from_args(args, Settings(allow_absolute_paths=True, allow_url_images=True))
    compile_from_args(args, settings, default_cache=_user_compile_cache())
    # Constructing the manager is cheap; finding the best device imports torch,
    # which cmd_run pays only once the workflow is known to be valid.
    return build_env(paths, settings, registry, getattr(args, "device", None))


def limits_from_args(args: argparse.Namespace, settings: Settings) -> Settings:
    """``--max-image-pixels``, ``--max-job-memory``, ``--allow-url-host`` (run, validate, serve) into the settings."""
    if getattr(args, "max_image_pixels", None):
        settings.max_image_pixels = args.max_image_pixels
    if getattr(args, "max_job_memory", None):
        settings.max_job_bytes = args.max_job_memory
    if getattr(args, "allow_url_host", None):
        settings.url_allow_hosts = tuple(args.allow_url_host)
    return settings


def compile_from_args(args: argparse.Namespace, settings: Settings, default_cache: str | None = None) -> Settings:
    """``--compile``, ``--offload`` and ``--precision`` (run, serve) into the settings, and where compiled code
    is kept."""
    if getattr(args, "compile", None):
        settings.compile = args.compile
    if getattr(args, "offload", None):  # --offload and --precision travel with --compile: how models are placed
        settings.offload = args.offload
    if getattr(args, "precision", None):
        settings.precision = args.precision
    if default_cache is not None and settings.compile_cache is None:
        settings.compile_cache = default_cache
    return settings


def _user_compile_cache() -> str:
    """kiln run's compiled-code folder: $KILN_DATA/compiled, else the user's cache folder (never ./data)."""
    if os.environ.get("KILN_DATA"):
        return str(Path(os.environ["KILN_DATA"]) / "compiled")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "kiln" / "compiled")

