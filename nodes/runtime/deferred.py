"""Parts of a held model that are built the first time a job needs them.

Krea 2's Qwen3-VL file holds a vision tower (about 0.4B parameters of the 4B), Qwen-Image's Qwen2.5-VL
one of about 0.7B, that only the nodes handing the encoder pictures run; a text-to-image job never does.
So the loader leaves the module's slot for it empty (``None``: the module holds, counts and moves only
what it built) and records how to build it from the file it already holds open (:func:`defer`). A use
that needs the part asks the model manager for it (nodes.runtime.models.ModelManager.use's ``parts``):
the manager builds it once (:func:`build`), counts its bytes in the entry and places it where the rest
of the module sits; from then on it is an ordinary submodule, offloaded and moved with the module.

The builders live in a plain attribute of the module (not a submodule, so ``parameters()``,
``state_dict()`` and ``.to()`` never see them).
"""
from __future__ import annotations

from typing import Any, Callable

#: The module attribute holding ``{part name: builder}`` for the parts not built yet.
ATTR = "_kiln_deferred"


def defer(module: Any, name: str, build: Callable[[], Any]) -> None:
    """Leave ``module.<name>`` empty until a use asks for it, then fill it with ``build()`` (a module,
    built on the CPU in the dtype the loader chose)."""
    setattr(module, name, None)
    pending = dict(getattr(module, ATTR, None) or {})
    pending[name] = build
    object.__setattr__(module, ATTR, pending)


def pending(module: Any) -> tuple[str, ...]:
    """The names of ``module``'s parts still waiting to be built."""
    return tuple(getattr(module, ATTR, None) or ())


def has_part(module: Any, name: str) -> bool:
    """Whether ``module`` has the part ``name``, built or waiting to be (a tower-less file's model has not)."""
    return getattr(module, name, None) is not None or name in pending(module)


def build(module: Any, name: str) -> Any:
    """Build part ``name`` of ``module`` if it waits, and put it in its slot. Returns the new part, or None
    when there was nothing to build (already built, or the module has no such part). The caller (the
    model manager) counts and places what it returns."""
    import torch

    builders = getattr(module, ATTR, None) or {}
    if name not in builders or getattr(module, name, None) is not None:
        return None
    with torch.inference_mode(False):  # the use asking may run in inference mode: the weights outlive it
        part = builders[name]()
    setattr(module, name, part)
    rest = {k: v for k, v in builders.items() if k != name}
    object.__setattr__(module, ATTR, rest)
    return part
