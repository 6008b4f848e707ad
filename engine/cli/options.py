"""The command line's shape: every command, option, default and help text.

Options several commands share (folders, limits, compile, offload, precision, lean memory) are
defined once here; each command's function comes from its own module.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from engine.budget import parse_bytes, parse_pixels
from engine.cli.inspect_commands import cmd_nodes, cmd_validate
from engine.cli.run import cmd_run
from engine.cli.serve import cmd_serve, cmd_worker


def _lean_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lean-memory", action="store_true",
                   help="return buffers a job frees to the system at once (glibc's mmap threshold fixed at "
                        "1 MiB): about 160 MiB less peak memory for SD1.5 at 256 px on the CPU, but sampling "
                        "measured 3-15 %% slower, so it is off by default")


def _offload_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", default="auto", choices=("auto", "on", "off"),
                   help="run the denoiser block by block, its weights resting in CPU memory (GPU) or on disk "
                        "(CPU host): auto = only when it does not fit the free memory (default); slower steps")


def _precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="the dtype models compute in: auto = fp16 on a GPU, fp32 on a CPU (default; fp32 is what "
                        "matches diffusers' float32 pipelines); bf16 is about 2.7x faster on CPUs that multiply it "
                        "natively (Intel AMX) and far slower on others")


def _compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the denoiser and VAE decoder: auto = on CUDA only, where it pays "
                        "(default); compiled code is kept under the data folder's compiled/ for the next start")


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
    run.add_argument("--keep-going", "-k", action="store_true",
                     help="when a node fails, skip only what needs its result and run every other branch "
                          "(the exit code is still 1)")
    _compile_option(run)
    _offload_option(run)
    _precision_option(run)
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
    _precision_option(serve)
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
    serve.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                       help="do not import the model libraries once listening (they are then imported by "
                            "the first job that needs them: seconds, on a CPU)")
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

