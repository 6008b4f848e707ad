"""Handles for the single-network models the model manager holds besides diffusion models:
upscalers (UPSCALE_MODEL), image encoders (CLIP_VISION) and style models (STYLE_MODEL).

A loader node returns a light handle; the network stays with the manager (loaded once per
file, placed on the compute device only while a node uses it, offloaded under memory
pressure), so a handle in the output cache costs no memory of its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from engine.context import NodeError
from nodes.loaders import locate, model_manager


@dataclass(eq=False)
class ModuleHandle:
    """A file's name, what its loader made (sizes, kind), and how to use its network."""

    name: str
    loaded: Any
    _use: Callable[[], contextlib.AbstractContextManager]

    @contextlib.contextmanager
    def module(self) -> Iterator[Any]:
        """The network on the compute device, pinned there while the block runs."""
        with self._use() as module:
            yield module

    def __kiln_nbytes__(self) -> int:
        return 0


def acquire_module(ctx, folder: str, name: str, input_name: str, kind: str, load: Callable[[Any, Any], Any],
                   errors: tuple[type[Exception], ...], handle: type[ModuleHandle] = ModuleHandle,
                   view: Callable[[Any, Any], Any] = lambda loaded, placed: placed) -> ModuleHandle:
    """Load ``name`` from ``folder`` through the model manager (``load(path, dtype)``, keyed by the
    file's identity and ``kind``); ``errors`` and running out of memory become a NodeError naming
    ``input_name``. The handle's module is ``view(loaded, placed)`` of the loaded object's only
    network: ``loaded`` as the manager holds it then, which after an eviction is a reload, not the
    object this call saw."""
    from nodes.runtime.models import file_key

    path = locate(ctx.env, folder, name, input_name)
    manager = model_manager(ctx.env)
    key = file_key(path, kind)

    def loader(mgr: Any) -> Any:
        return load(path, mgr.dtype)

    try:
        loaded = manager.acquire(key, loader)
    except errors as exc:
        raise NodeError(str(exc), input_name) from None
    except MemoryError:
        raise NodeError(f"not enough memory to load {name}", input_name) from None
    module = next(iter(loaded.kiln_modules()))

    @contextlib.contextmanager
    def use() -> Iterator[Any]:
        with manager.use(key, module, loader) as placed:
            yield view(manager.acquire(key, loader), placed)

    return handle(name=name, loaded=loaded, _use=use)
