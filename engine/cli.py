"""The `kiln` command: run | validate | nodes | serve | worker.

``kiln run`` executes a workflow in this process with the same Executor the
server uses, so a workflow behaves identically headless and behind the API. It is
made for scripts: stdout carries only results (NDJSON events with ``--json``),
progress and errors go to stderr, and the exit code says what happened:

    0  the job succeeded
    1  a node failed (its id, type, input and message are printed)
    2  the workflow (or a --set value) is invalid; every problem is printed
    130 interrupted (Ctrl-C: the job stops at the next node or sampler step)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence, TextIO

from engine import types as T
from engine.budget import parse_bytes, parse_pixels
from engine.context import Environment, JobInfo, Paths, Settings, build_env, default_data_dir
from engine.paths import PathRefused, SafeRoot
from engine.registry import Registry, default_registry
from engine.submission import MAX_JSON_DEPTH, SubmissionInvalid, json_problem, prepare, problem
from engine.validate import ValidationError
from engine.formats import parse_document
from engine.workflow import Workflow, WorkflowFormatError

EXIT_OK, EXIT_NODE_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageProblem(Exception):
    """Something wrong with what the user asked for (file, --set, the workflow): every problem found."""

    def __init__(self, errors: list[ValidationError]) -> None:
        self.errors = errors
        super().__init__("; ".join(e.message for e in errors))


# -- the environment -------------------------------------------------------------------

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
    """``--compile MODE`` (run, serve) into the settings, and where compiled code is kept."""
    if getattr(args, "compile", None):
        settings.compile = args.compile
    if getattr(args, "offload", None):  # --offload travels with --compile: both say how models are placed
        settings.offload = args.offload
    if default_cache is not None and settings.compile_cache is None:
        settings.compile_cache = default_cache
    return settings


def _user_compile_cache() -> str:
    """kiln run's compiled-code folder: $KILN_DATA/compiled, else the user's cache folder (never ./data)."""
    if os.environ.get("KILN_DATA"):
        return str(Path(os.environ["KILN_DATA"]) / "compiled")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "kiln" / "compiled")


def _lean_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lean-memory", action="store_true",
                   help="return buffers a job frees to the system at once (glibc's mmap threshold fixed at "
                        "1 MiB): about 160 MiB less peak memory for SD1.5 at 256 px on the CPU, but sampling "
                        "measured 3-15 %% slower, so it is off by default")


def _offload_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", default="auto", choices=("auto", "on", "off"),
                   help="run the denoiser block by block, its weights resting in CPU memory (GPU) or on disk "
                        "(CPU host): auto = only when it does not fit the free memory (default); slower steps")


def _compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the denoiser and VAE decoder: auto = on CUDA only, where it pays "
                        "(default); compiled code is kept under the data folder's compiled/ for the next start")


# -- reading the workflow and --set ----------------------------------------------------

def _parse_value(raw: str, input_type: str | None) -> Any:
    """--set values stay strings (validation coerces them by the schema), except JSON lists/objects.

    Text inputs (STRING, COMBO) always keep the string, so a prompt that happens
    to start with '[' is not turned into a list.
    """
    if input_type in (T.STRING, T.COMBO):
        return raw
    stripped = raw.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
    return raw


def _read_sets(wf: Workflow, registry: Registry, sets: Sequence[str],
               image: str | None) -> tuple[dict[str, Any], list[ValidationError]]:
    """The --set / --image values as parameters (typed where the target input is known), and the problems.

    Names are judged by the shared submission path, so an unknown one is reported
    with every other problem of the command line and the workflow.
    """
    problems: list[ValidationError] = []
    raw: dict[str, str] = {}
    for item in sets:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            problems.append(problem("invalid_parameter", f"--set '{item}' is not NAME=VALUE"))
            continue
        raw[name.strip()] = value
    if image is not None:
        loaders = sorted((n for n in wf.nodes.values() if n.type and registry.get(n.type) is not None
                          and registry.get(n.type).type == "LoadImage"), key=lambda n: _id_key(n.id))
        if not loaders:
            problems.append(problem("invalid_parameter", "--image given but the workflow has no LoadImage node"))
        else:
            raw.setdefault(f"{loaders[0].id}.image", image)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        target = wf.resolve_param(name)
        node = wf.nodes[target[0]] if target else None
        spec = registry.get(node.type) if node is not None and node.type else None
        inp = spec.input(target[1]) if spec is not None and target else None
        values[name] = _parse_value(value, inp.type if inp else None)
    return values, problems


def _id_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _load(path: str, registry: Registry) -> Workflow:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageProblem([problem("invalid_workflow", f"no such workflow file: {path}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageProblem([problem("invalid_workflow", f"cannot read {path}: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise UsageProblem([problem("invalid_workflow", f"{path}: not valid JSON: {exc}")]) from None
    except RecursionError:
        raise UsageProblem([problem("invalid_workflow", f"{path}: the JSON nests deeper than "
                                                        f"{MAX_JSON_DEPTH} levels")]) from None
    trouble = json_problem(doc)
    if trouble:
        raise UsageProblem([problem("invalid_workflow", f"{path}: {trouble}")])
    try:
        return parse_document(doc, registry)
    except WorkflowFormatError as exc:
        raise UsageProblem([problem("invalid_workflow", f"{path}: {exc}")]) from None


# -- reporting -------------------------------------------------------------------------

def _emit_json(stream: TextIO, payload: dict[str, Any]) -> None:
    stream.write(json.dumps(payload, default=str) + "\n")
    stream.flush()


def _report_invalid(errors: list[ValidationError], as_json: bool) -> int:
    sys.stderr.write(f"invalid workflow: {len(errors)} problem(s)\n")
    for e in errors:
        sys.stderr.write(f"  - [{e.type}] {e}\n")
    if as_json:
        _emit_json(sys.stdout, {"type": "validation_failed", "errors": [e.to_dict() for e in errors]})
    return EXIT_INVALID


def _prepare(args: argparse.Namespace, env: Environment, registry: Registry) -> tuple[Workflow, Any, dict]:
    """Load, read --set, and go through the shared submission path; UsageProblem carries every problem."""
    wf = _load(args.workflow, registry)
    values, problems = _read_sets(wf, registry, args.set or [], getattr(args, "image", None))
    try:
        return prepare(wf, registry, env, values, problems=problems)
    except SubmissionInvalid as exc:
        raise UsageProblem(exc.errors) from None


# -- commands --------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from engine.executor import Executor

    registry = default_registry()
    temp_dir = tempfile.mkdtemp(prefix="kiln-run-")
    try:
        env = cli_env(args, temp_dir=temp_dir, create_output=True, registry=registry)
        try:
            wf, plan, params = _prepare(args, env, registry)
        except UsageProblem as exc:
            return _report_invalid(exc.errors, args.json)
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
                _emit_json(sys.stdout, event.to_dict())
            renderer(event)

        # The console shows no images and --json carries none: no node makes previews.
        job = JobInfo(id=uuid.uuid4().hex, workflow=plan.api_prompt(), kiln_workflow=wf.to_kiln(), params=params,
                      previews=False)
        interrupt = threading.Event()
        with _sigint_sets(interrupt):
            try:
                outcome = Executor(registry, env).run(plan, job=job, force=args.force, on_event=on_event,
                                                      interrupt=interrupt)
            except KeyboardInterrupt:
                sys.stderr.write("aborted\n")
                return EXIT_INTERRUPTED
        if not args.json and outcome.status == "succeeded" and not sys.stdout.isatty():
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


def cmd_validate(args: argparse.Namespace) -> int:
    registry = default_registry()
    env = cli_env(args)
    try:
        _, plan, _ = _prepare(args, env, registry)
    except UsageProblem as exc:
        return _report_invalid(exc.errors, args.json)
    if args.json:
        _emit_json(sys.stdout, {"type": "valid", "nodes": plan.order, "outputs": plan.outputs})
    else:
        print(f"ok: {len(plan.order)} node(s) would run, output node(s): {', '.join(plan.outputs)}")
    return EXIT_OK


def _describe_input(entry: dict[str, Any]) -> str:
    text = f"{entry['name']}:{entry['type']}"
    return text if entry.get("required") else text + "?"


def cmd_nodes(args: argparse.Namespace) -> int:
    registry = default_registry()
    env = cli_env(args)
    schemas = registry.schemas(env)
    for name, reason in registry.load_errors.items():
        sys.stderr.write(f"warning: node package '{name}' failed to load: {reason}\n")
    if args.json:
        print(json.dumps(schemas, indent=2, default=str))
        return EXIT_OK
    rows = [(s["type"], s["category"], ", ".join(_describe_input(i) for i in s["inputs"]),
             ", ".join(o["type"] for o in s["outputs"]) or ("(output)" if s["output_node"] else ""))
            for s in sorted(schemas.values(), key=lambda s: (s["category"], s["type"]))]
    header = ("TYPE", "CATEGORY", "INPUTS (? = optional)", "OUTPUTS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    for row in [header, *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}  ->  {row[3]}")
    return EXIT_OK


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
               move_damaged_db=args.move_damaged_db, devices=_devices(args.devices), cluster=args.cluster,
               cluster_timeout=args.cluster_timeout, max_attempts=args.max_attempts,
               preview_method=args.preview_method, frontend=args.frontend, batch_jobs=args.batch_jobs)
    return EXIT_OK


def _devices(text: str | None) -> list[str] | None:
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
    devices: list[str | None] = list(_devices(args.devices) or [None])
    try:
        asyncio.run(cluster_worker.serve(args.scheduler, registry, devices, args.data, args.models, name=args.name,
                                         host=args.listen, timeout=args.timeout))
    except (OSError, cluster_worker.VersionRefused) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_INVALID
    return EXIT_OK


# -- arguments -------------------------------------------------------------------------

def _folders(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("--input-dir", default="input", metavar="DIR", help="folder LoadImage names refer to (./input)")
    if output:
        p.add_argument("--output-dir", default="output", metavar="DIR", help="where images are saved (./output)")
    p.add_argument("--models", default="models", metavar="DIR", help="model folder with checkpoints/, vae/ (./models)")


def _limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=_option(parse_pixels), metavar="WxH",
                   help="largest image a node may load or make, e.g. 8192x8192 (the default)")
    p.add_argument("--max-job-memory", type=_option(parse_bytes), metavar="SIZE",
                   help="estimated memory of a job's images and latents, e.g. 16G "
                        "(default: half of this machine's memory)")
    p.add_argument("--allow-url-host", action="append", default=[], metavar="HOST_OR_CIDR",
                   help="a trusted host name or network (10.1.0.0/16) that URL images may reach although its "
                        "addresses are loopback, private or link-local (repeatable)")


def _option(parse_fn: Any) -> Any:
    def convert(text: str) -> int:
        try:
            return parse_fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse_fn.__name__.removeprefix("parse_")
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: a node-graph engine for diffusion images")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a workflow here, without a server",
                         description="Run a workflow in this process. Exit codes: 0 ok, 1 a node failed, "
                                     "2 invalid workflow, 130 interrupted.")
    run.add_argument("workflow", help="workflow JSON (Kiln or ComfyUI API format)")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="set a named parameter or NODE_ID.INPUT (repeatable); typed by the node's schema")
    run.add_argument("--image", metavar="PATH_OR_URL", help="image for the first LoadImage node")
    _folders(run)
    run.add_argument("--device", default=None, help="compute device (default: the best available)")
    run.add_argument("--json", action="store_true", help="NDJSON events on stdout, one per line")
    run.add_argument("--force", action="store_true", help="run every node even if cached")
    _compile_option(run)
    _offload_option(run)
    _lean_memory_option(run)
    _limits(run)
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a workflow without running it")
    val.add_argument("workflow")
    val.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    val.add_argument("--image", metavar="PATH_OR_URL")
    _folders(val)
    val.add_argument("--json", action="store_true")
    _limits(val)
    val.set_defaults(func=cmd_validate)

    nodes = sub.add_parser("nodes", help="list the installed node types")
    nodes.add_argument("--json", action="store_true", help="full schemas as JSON")
    _folders(nodes, output=False)
    nodes.set_defaults(func=cmd_nodes, output_dir="output")

    serve = sub.add_parser("serve", help="start the HTTP server and editor")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--models", default="models", metavar="DIR")
    serve.add_argument("--data", default=None, metavar="DIR", help="queue, history, input/output (./data or $KILN_DATA)")
    serve.add_argument("--workflows", default="workflows", metavar="DIR")
    serve.add_argument("--token", default=os.environ.get("KILN_TOKEN"),
                       help="require this bearer token (default: $KILN_TOKEN)")
    serve.add_argument("--allow-url-images", action="store_true", help="let LoadImage fetch http(s) URLs")
    # The modes are the node library's to define and check; the engine only passes them on.
    serve.add_argument("--safety-filter", default=None, metavar="MODE",
                       help="classify every image a job saves or previews: flag, blur, black or drop the "
                            "flagged ones (needs --safety-checker)")
    serve.add_argument("--safety-checker", default=None, metavar="NAME",
                       help="the StableDiffusionSafetyChecker in MODELS/safety_checker (folder or .safetensors)")
    _limits(serve)
    _compile_option(serve)
    _offload_option(serve)
    _lean_memory_option(serve)
    serve.add_argument("--debug", action="store_true",
                       help="also keep a failed job's traceback (shortened) in its record; "
                            "tracebacks always go to the server log")
    serve.add_argument("--move-damaged-db", action="store_true",
                       help="if the job database is damaged, move it aside and start empty "
                            "(default: report it and stop)")
    serve.add_argument("--devices", default=None, metavar="LIST",
                       help="one job lane per device, e.g. cuda:0,cuda:1 (default: every visible GPU, or the CPU)")
    serve.add_argument("--cluster", default=None, metavar="tcp://HOST:PORT",
                       help="send jobs to `kiln worker`s through this Dask scheduler instead of running them here")
    serve.add_argument("--cluster-timeout", type=float, default=10.0, metavar="S",
                       help="give up reaching the scheduler after S seconds (10)")
    serve.add_argument("--max-attempts", type=int, default=3, metavar="N",
                       help="a job whose workers die N times fails instead of running again (3)")
    from engine.server.previews import PREVIEW_METHODS  # plain data: no server dependencies
    from engine.batching import BATCH_JOBS_DEFAULT

    serve.add_argument("--frontend", default="kiln", choices=("kiln", "comfyui"),
                       help="the page at /: Kiln's editor, or ComfyUI's official frontend (needs the "
                            "comfyui-frontend-package; Kiln's editor then lives at /kiln/)")
    serve.add_argument("--preview-method", default="none", choices=PREVIEW_METHODS,
                       help="live previews for jobs that do not choose (ComfyUI's flag; default none: a job "
                            "gets previews only if it asks with extra_data.preview_method)")
    serve.add_argument("--batch-jobs", type=int, default=BATCH_JOBS_DEFAULT, metavar="N",
                       help="run up to N queued jobs that differ only in their seeds as one sampler batch "
                            f"(default {BATCH_JOBS_DEFAULT}; 1 runs every job alone)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="serve jobs of a `kiln serve --cluster` server from a Dask scheduler")
    worker.add_argument("scheduler", metavar="tcp://HOST:PORT", help="the Dask scheduler's address")
    worker.add_argument("--devices", default=None, metavar="LIST",
                        help="one Dask worker per device, e.g. cuda:0,cuda:1 (default: the best one)")
    worker.add_argument("--models", default="models", metavar="DIR", help="model folder (./models)")
    worker.add_argument("--data", default="kiln-worker", metavar="DIR",
                        help="scratch folder for input copies and outputs on their way back (./kiln-worker)")
    worker.add_argument("--name", default=None, help="worker name shown in job records (default: host and pid)")
    worker.add_argument("--listen", default=None, metavar="HOST",
                        help="interface to listen on (default: loopback for a loopback scheduler, else Dask's pick)")
    worker.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="give up reaching the scheduler after S seconds (10)")
    _lean_memory_option(worker)
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
