"""ComfyUI's GITSScheduler: Geometry-Inspired Time Scheduling's searched noise levels for SD.

GITS (Chen et al., ICML 2024) searched, for each step count from 2 to 20 and each ``coeff``
from 0.80 to 1.50 in steps of 0.05, the SD noise levels that keep the sampling trajectory
closest to its regular shape; a larger coeff spends more steps at low noise. The table is
ComfyUI's (``comfy_extras/nodes_gits.py``), kept as data in ``assets/gits_levels.json`` because
it is 285 lists long. Beyond 20 steps the 20-step list is stretched log-linearly, and denoise
and the final 0 follow AlignYourStepsScheduler's rule, as in ComfyUI.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.custom_schedulers import denoised_tail, log_linear

_TABLE = Path(__file__).resolve().parent / "assets" / "gits_levels.json"
#: The step counts the table has a list for.
TABLE_STEPS = range(2, 21)


@functools.cache
def gits_levels() -> dict[str, tuple[tuple[float, ...], ...]]:
    """coeff ("0.80" .. "1.50") -> the lists for 2 .. 20 steps, each steps + 1 levels long."""
    levels = json.loads(_TABLE.read_text(encoding="utf-8"))["levels"]
    return {coeff: tuple(tuple(row) for row in rows) for coeff, rows in levels.items()}


def coeff_key(coeff: float) -> str:
    """The table's key for ``coeff``, which must be a multiple of 0.05 in 0.80..1.50 (ComfyUI
    fails on any other value; Kiln names the input)."""
    twentieths = float(coeff) * 20
    key = f"{round(twentieths) / 20:.2f}"
    if abs(twentieths - round(twentieths)) > 1e-6 or key not in gits_levels():
        raise NodeError(f"coeff must be one of 0.80, 0.85, ..., 1.50 (GITS's table has no list for {coeff})",
                        "coeff")
    return key


def gits_sigmas(coeff: float, steps: int, denoise: float):
    """The SIGMAS GITSScheduler gives (float32, descending, ending at 0)."""
    rows = gits_levels()[coeff_key(coeff)]
    steps = int(steps)
    if steps < TABLE_STEPS.start:
        raise NodeError(f"steps must be at least {TABLE_STEPS.start}", "steps")
    levels = rows[steps - TABLE_STEPS.start] if steps in TABLE_STEPS else log_linear(rows[-1], steps + 1)
    return denoised_tail(levels, steps, denoise)


@define_node("GITSScheduler", category="sampling/schedulers",
             inputs=[Input("coeff", T.FLOAT, default=1.20, min=0.80, max=1.50, step=0.05),
                     Input("steps", T.INT, default=10, min=2, max=1000),
                     Input("denoise", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def gits_scheduler(ctx, coeff: float, steps: int, denoise: float):
    """GITS's searched SD noise levels for ``steps`` steps (2..20 from its table, more stretched
    log-linearly from the 20-step list); a larger coeff puts more steps at low noise. Below
    denoise 1 the last ``round(steps * denoise)`` steps; the last level is 0."""
    return (gits_sigmas(coeff, steps, denoise),)
