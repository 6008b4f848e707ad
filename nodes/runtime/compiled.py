"""Compiled mode: torch.compile (inductor) of the denoiser network and the VAE decoder.

Whether to compile is one rule, :func:`should_compile`: ``on`` and ``off`` mean
what they say; ``auto`` compiles on CUDA only. On this project's CPU machines
inductor took more than ten minutes to compile even the tiny test UNet (two
contended cores, see the perf notes), far beyond what its steady-state gain could
pay back within a session, so ``auto`` leaves the CPU eager until measurements
say otherwise.

Modules are compiled in place (``Module.compile``), so their parameter names stay
those of the eager module: LoRA patches (nodes.runtime.patches) still find and
modify the weights in place, and inductor reads the patched values because
parameters stay graph inputs (weights are not frozen into the compiled code).
Compiled artefacts go to inductor's FX graph cache under a folder the caller
names (the data folder's ``compiled/``), so another process or a restart reuses
them instead of compiling again.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODES = ("auto", "on", "off")

#: Module names (in a loaded entry) that are compiled, and the submodule compiled in each:
#: the whole denoiser; of the VAE only the decoder (the encoder runs once per input image).
TARGETS = {"unet": "", "vae": "decoder"}

#: Rough first-compile cost, to tell the user what to expect (measured figures: see the README).
EXPECTED_WAIT = {"cuda": "about a minute", "cpu": "several minutes"}

_configured: set[str] = set()
_lock = threading.Lock()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def should_compile(mode: str, device: str) -> bool:
    """The one rule: ``on``/``off`` as asked; ``auto`` = on CUDA only (see the module's note)."""
    check_mode(mode)
    if mode == "auto":
        return device.startswith("cuda")
    return mode == "on"


def use_cache_dir(folder: str | os.PathLike[str] | None) -> None:
    """Point inductor's on-disk caches (FX graph cache, compiled kernels) into ``folder``.

    Inductor reads TORCHINDUCTOR_CACHE_DIR when it first needs it, so this is set
    before the first compilation; a folder set by the user's environment wins.
    """
    if folder is None:
        return
    with _lock:
        path = str(Path(folder).resolve())
        if path in _configured:
            return
        Path(path).mkdir(parents=True, exist_ok=True)
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # torch writes its default into the variable the first time it asks, so only a
        # value other than that default was chosen by the user.
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        _configured.add(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


def compile_in_place(module: Any, name: str) -> bool:
    """Compile the part of ``module`` that :data:`TARGETS` names for ``name``; False when not a target.

    Idempotent: a module already compiled is left alone.
    """
    if name not in TARGETS:
        return False
    part = module.get_submodule(TARGETS[name]) if TARGETS[name] else module
    if getattr(part, "_kiln_compiled", False):
        return True
    part.compile(backend="inductor")
    part._kiln_compiled = True
    return True


def is_compiled(module: Any, name: str) -> bool:
    if name not in TARGETS:
        return False
    part = module.get_submodule(TARGETS[name]) if TARGETS[name] else module
    return bool(getattr(part, "_kiln_compiled", False))


@contextlib.contextmanager
def eager_while_hooked() -> Iterator[None]:
    """Run compiled modules eagerly while a patch's temporary forward hooks are on them.

    Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``):
    a graph traced while hooks were in would be reused after they are gone, and one traced
    without them would ignore them (FreeU, Deep Shrink, skip layers, FluxDisableGuidance and
    GLIGEN gave the plain model's output on a compiled UNet; tests/test_compiled_patches.py).
    Every place that hooks a network for a while enters this, so no hooked call is traced and
    no trace is used under hooks; on an eager module it changes nothing.
    """
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield


@contextlib.contextmanager
def while_hooked(handles: list) -> Iterator[None]:
    """The block run with the hooks ``handles`` were registered for (compiled modules eagerly, see
    :func:`eager_while_hooked`), each removed when it ends, however it ends."""
    try:
        with eager_while_hooked():
            yield
    finally:
        for handle in handles:
            handle.remove()
