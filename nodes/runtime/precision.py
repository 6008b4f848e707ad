"""The dtype models compute in (``--precision``), and when to suggest another.

``auto`` is half precision (float16) on a GPU and float32 on a CPU: most CPUs have no native half
precision, and there bf16/fp16 matrix products are emulated, about 80x slower (AMD EPYC, AVX2). Intel
Xeons since Sapphire Rapids multiply bfloat16 natively (AMX), where full-size SD 1.5 txt2img took
7.6 s per image in bf16 against 20.8 s in float32 (bench/cpu_precision.py): on such a CPU
``--precision bf16`` is offered in the loaders' messages, not chosen, because float32 is what makes
Kiln's images equal diffusers' float32 pipelines and bf16 moves them a little (4.5/255 there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

#: ``--precision`` choices -> torch dtype names; "auto" is :func:`dtype_for`'s rule
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CHOICES = ("auto", *DTYPES)
#: CPU flags of native bfloat16 arithmetic (Linux's names)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def check_mode(mode: str) -> str:
    if mode not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, got {mode!r}")
    return mode


def dtype_for(mode: str, gpu: bool) -> Any:
    """The compute dtype of ``mode`` on a GPU (``gpu``) or a CPU."""
    import torch

    if mode in DTYPES:
        return getattr(torch, DTYPES[mode])
    return torch.float16 if gpu else torch.float32


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16), from Linux's CPU flags;
    False where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def note(mode: str, gpu: bool) -> str:
    """", <what --precision could give>" for a loader's message: only where ``auto`` left a CPU with
    native bfloat16 in float32."""
    if mode != "auto" or gpu or not cpu_has_native_bf16():
        return ""
    return (" (this CPU multiplies bfloat16 natively: --precision bf16 samples about 2.7x faster, with images "
            "slightly different from float32's)")
