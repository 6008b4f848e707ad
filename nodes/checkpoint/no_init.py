"""Building a module whose every weight the file fills next, without initialising the weights first.

accelerate's ``init_empty_weights`` (nodes.checkpoint.load._empty) puts parameters on the meta
device, but the constructors still run their initialisers on them: torch's ``reset_parameters``
(kaiming_uniform_ on every Linear) and then transformers' whole second pass in ``post_init``,
whose ``normal_`` on a meta tensor goes through torch's Python meta kernels (about 1.6 ms each).
That was four fifths of building a tiny transformers text encoder and a third of a diffusers
model, and scales with the layer count of a real one. Inside :func:`skipped_init` both are no-ops
for the calling thread only: the initialisers are wrapped while any thread builds (a count
under a lock), and the wrappers do nothing unless their thread is building. Buffers keep the
values their constructors compute (rotary frequencies, position ids): nothing initialises
those here, and transformers' tying of shared weights still runs (it is not part of the pass).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

_state = threading.local()
_lock = threading.Lock()
_builders = 0
_originals: list[tuple[Any, str, Callable[..., Any]]] = []


def _building() -> bool:
    return getattr(_state, "depth", 0) > 0


def _skipping(original: Callable[..., Any], result: Callable[[tuple[Any, ...]], Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def maybe(*args: Any, **kwargs: Any) -> Any:
        return result(args) if _building() else original(*args, **kwargs)
    return maybe


def _targets() -> list[tuple[Any, str, Callable[[tuple[Any, ...]], Any]]]:
    """(owner, attribute, what the skipped call returns): torch's in-place initialisers return
    their tensor; transformers' pass returns nothing."""
    import torch.nn.init as torch_init

    found: list[tuple[Any, str, Callable[[tuple[Any, ...]], Any]]] = [
        (torch_init, name, lambda args: args[0]) for name in dir(torch_init)
        if name.endswith("_") and not name.startswith("_") and callable(getattr(torch_init, name))]
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return found
    return found + [(PreTrainedModel, "initialize_weights", lambda args: None)]


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Constructors called in this block, on this thread, initialise no weights."""
    global _builders
    with _lock:
        if _builders == 0:
            for owner, name, result in _targets():
                original = getattr(owner, name)
                _originals.append((owner, name, original))
                setattr(owner, name, _skipping(original, result))
        _builders += 1
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        with _lock:
            _builders -= 1
            if _builders == 0:
                while _originals:
                    owner, name, original = _originals.pop()
                    setattr(owner, name, original)
