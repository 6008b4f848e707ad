"""A checkpoint's tensors read one at a time, so a load never holds two copies of a weight set.

``safetensors.torch.load_file`` memory-maps the whole file and hands out views of
that one mapping: every page read while converting stays resident until the last
view is gone, so casting an fp16 file to fp32 (or fp32 to fp16 for a GPU) peaks
at the file plus the converted set. :class:`LazyState` instead reads each tensor
with ``pread`` when a converter asks for it and casts it at once (to the dtype of
the view it was read through), so the source tensor is dropped before the next
is read: the peak is the converted set plus one tensor. The weights are then
ordinary memory, independent of the file (replacing or truncating a loaded file
cannot fault a running model).

Detection reads through the uncast view (``dtype=None``), so its statistics are
those of the file's own values, as before.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class LazyState(Mapping):
    """A read-only ``{name: tensor}`` view of a .safetensors file; tensors are read on access.

    ``renames`` maps this view's keys to the file's (a prefix added or dropped, a
    layout change); ``dtype`` casts floating tensors as they are read. Views share
    the open file; each access reads anew, so hold a tensor only as long as needed.
    """

    def __init__(self, handle: Any, renames: dict[str, str], dtype: Any = None) -> None:
        self._handle = handle
        self._renames = renames
        self.dtype = dtype

    @classmethod
    def open(cls, path: Path) -> "LazyState":
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt", backend="pread")
        return cls(handle, {k: k for k in handle.keys()})

    # -- views -------------------------------------------------------------------------------

    def with_dtype(self, dtype: Any) -> "LazyState":
        """The same tensors, floating ones cast to ``dtype`` as they are read."""
        return LazyState(self._handle, self._renames, dtype)

    def renamed(self, renames: dict[str, str]) -> "LazyState":
        """A view whose key ``new`` reads this view's key ``renames[new]``."""
        return LazyState(self._handle, {new: self._renames[old] for new, old in renames.items()}, self.dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the header alone (nothing is read)."""
        return {k: tuple(self._handle.get_slice(src).get_shape()) for k, src in self._renames.items()}

    def dtypes(self) -> dict[str, Any]:
        """Every tensor's dtype as stored in the file, from the header alone (nothing is read)."""
        import torch

        return {k: getattr(torch, _DTYPES[self._handle.get_slice(src).get_dtype()])
                for k, src in self._renames.items()}

    def materialise(self) -> dict[str, Any]:
        """A plain dict of every tensor (for code that needs one, e.g. FLUX's loaders)."""
        return {k: self[k] for k in self._renames}

    # -- Mapping -------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        tensor = self._handle.get_tensor(self._renames[key])
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._renames

    def __iter__(self) -> Iterator[str]:
        return iter(self._renames)

    def __len__(self) -> int:
        return len(self._renames)


class ShardedState(Mapping):
    """One read-only view over a component saved in several .safetensors files (diffusers' sharded
    ``*.safetensors.index.json``: each key's file in ``weight_map``); tensors are read on access."""

    def __init__(self, parts: dict[str, LazyState]) -> None:
        self._parts = parts  # key -> the LazyState of its file

    @classmethod
    def open_index(cls, index: Path) -> "ShardedState":
        import json

        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: LazyState.open(index.parent / f) for f in sorted(set(weight_map.values()))}
        return cls({k: files[f] for k, f in weight_map.items()})

    def with_dtype(self, dtype: Any) -> "ShardedState":
        """The same tensors, floating ones cast to ``dtype`` as they are read (LazyState.with_dtype)."""
        views = {id(p): p.with_dtype(dtype) for p in self._parts.values()}
        return ShardedState({k: views[id(p)] for k, p in self._parts.items()})

    def renamed(self, renames: dict[str, str]) -> "ShardedState":
        """A view whose key ``new`` reads this view's key ``renames[new]`` (nothing is read)."""
        groups: dict[int, tuple[LazyState, dict[str, str]]] = {}
        for new, old in renames.items():
            part = self._parts[old]
            groups.setdefault(id(part), (part, {}))[1][new] = old
        out = {}
        for part, names in groups.values():
            view = part.renamed(names)
            out.update(dict.fromkeys(names, view))
        return ShardedState(out)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        per_file = {id(p): p.shapes() for p in self._parts.values()}
        return {k: per_file[id(p)][k] for k, p in self._parts.items()}

    def dtypes(self) -> dict[str, Any]:
        per_file = {id(p): p.dtypes() for p in self._parts.values()}
        return {k: per_file[id(p)][k] for k, p in self._parts.items()}

    def __getitem__(self, key: str) -> Any:
        return self._parts[key][key]

    def __contains__(self, key: object) -> bool:
        return key in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def renamed_view(state: Mapping, renames: dict[str, str]) -> Mapping:
    """``state`` under new names (``renames``: new -> old) with nothing read: a LazyState's or ShardedState's
    view (each tensor read when asked for), a plain dict of the same tensors."""
    if isinstance(state, (LazyState, ShardedState)):
        return state.renamed(renames)
    return {new: state[old] for new, old in renames.items()}


def shapes_of(state: Mapping) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a LazyState or ShardedState (header only) or of a plain dict of tensors."""
    if isinstance(state, (LazyState, ShardedState)):
        return state.shapes()
    return {k: tuple(v.shape) for k, v in state.items()}


#: safetensors' dtype names -> torch's.
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


def dtypes_of(state: Mapping) -> dict[str, Any]:
    """Tensor dtypes of a LazyState or ShardedState (header only) or of a plain dict of tensors."""
    if isinstance(state, (LazyState, ShardedState)):
        return state.dtypes()
    return {k: v.dtype for k, v in state.items()}


def cast_view(state: Mapping, dtype: Any) -> Mapping:
    """``state`` read as ``dtype``: a casting view of a LazyState or ShardedState, a plain dict unchanged
    (cast on assign)."""
    return state.with_dtype(dtype) if isinstance(state, (LazyState, ShardedState)) else state


def plain(state: Mapping) -> dict[str, Any]:
    """A plain dict for code that wants one (FLUX's loaders): a LazyState is read in full."""
    return state.materialise() if isinstance(state, LazyState) else state


def stored_bytes(value: Any) -> bytes | None:
    """The raw bytes of a file carried inside a state dict (a tokenizer stored as a uint8 tensor, as
    Comfy-Org's text encoders carry theirs), or None for no value."""
    if value is None:
        return None
    if hasattr(value, "numpy"):
        return value.detach().cpu().contiguous().numpy().tobytes()
    return bytes(value)
