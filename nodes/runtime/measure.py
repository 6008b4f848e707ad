"""How much memory a model's torch modules take, and where they are.

The model manager's accounting rests on these: what a stored object's modules are, the
bytes they hold in RAM (none for one paged to disk), and the device they sit on. The
loaders ask the same questions before they load, so the rule lives here once.
"""
from __future__ import annotations

import os
from typing import Any


def physical_memory() -> int:
    """The machine's RAM (16 GiB where the OS will not say): the default CPU budget is a share of it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


def modules_of(value: Any) -> dict[str, Any]:
    """The torch modules inside a stored object, by name.

    A module itself is named ""; a dict contributes its module values; any other
    object may list its modules with a ``kiln_modules()`` method returning a dict.
    """
    import torch

    if isinstance(value, torch.nn.Module):
        return {"": value}
    listed = getattr(value, "kiln_modules", None)
    if callable(listed):
        value = listed()
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, torch.nn.Module)}
    return {}


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers, a tensor tied under two names (T5's embedding as
    ``shared`` and ``encoder.embed_tokens``) counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = id(t) if t.device.type == "meta" else (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def held_bytes(module: Any) -> int:
    """Bytes a module holds in RAM: none for one paged to disk (its tensors are unbacked placeholders)."""
    from nodes.runtime.offload import offloaded

    info = offloaded(module)
    return 0 if info is not None and info.paged else module_bytes(module)


def module_device(module: Any) -> str:
    """The device of a module's first parameter ("cpu" for one with none)."""
    for t in module.parameters():
        return str(t.device)
    return "cpu"
