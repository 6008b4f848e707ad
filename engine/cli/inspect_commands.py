"""``kiln validate`` and ``kiln nodes``: answers about workflows and node types, nothing run."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine.cli.environment import cli_env
from engine.cli.report import EXIT_OK, emit_json, report_ignored, report_invalid
from engine.cli.workflow_input import UsageProblem, prepare_job
from engine.registry import default_registry


def cmd_validate(args: argparse.Namespace) -> int:
    registry = default_registry()
    env = cli_env(args)
    try:
        _, plan, _ = prepare_job(args, env, registry)
    except UsageProblem as exc:
        return report_invalid(exc.errors, args.json)
    report_ignored(plan.ignored)
    if args.json:
        emit_json(sys.stdout, {"type": "valid", "nodes": plan.order, "outputs": plan.outputs,
                               "ignored": [e.to_dict() for e in plan.ignored]})
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

