"""ConvRot: the group-wise Hadamard rotation behind ComfyUI's ``int8_convrot`` weights.

Int8 with one scale per output row loses the small values of a row that also holds a large one.
Comfy-Org's int8 files (``*_int8_convrot``, written by comfy-kitchen's quantiser) therefore rotate
each weight's columns first, group by group: ``W_rot = W @ H`` for every run of ``group`` columns,
with ``H`` the normalised regular Hadamard matrix of that size (a power of 4: Kronecker powers of
the 4x4 matrix whose rows are ``1 1 1 -1``, ``1 1 -1 1``, ``1 -1 1 1``, ``-1 1 1 1``, divided by
the square root of its size). That ``H`` is symmetric and orthogonal, so it is its own inverse: the
same rotation gives ``W`` back from ``W_rot``, and ``x @ W.T == (x @ H) @ W_rot.T``. A layer can
therefore keep its int8 weight in the rotated basis and rotate its input instead, which costs
``group`` multiply-adds per input value rather than a whole weight rebuilt per call
(nodes.runtime.fp8.CastLinear does this).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

_REGULAR_4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def is_group_size(size: int) -> bool:
    """Whether ``size`` is one the rotation is defined for (a power of 4, at least 4)."""
    return size >= 4 and size & (size - 1) == 0 and (size.bit_length() - 1) % 2 == 0


@lru_cache(maxsize=16)
def _hadamard(size: int, device: str, dtype: Any) -> Any:
    import torch

    if not is_group_size(size):
        raise ValueError(f"a ConvRot group has a power-of-4 size, got {size}")
    h4 = torch.tensor(_REGULAR_4, dtype=torch.float64)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return (h / size ** 0.5).to(device=device, dtype=dtype)


def hadamard(size: int, device: Any = "cpu", dtype: Any = None) -> Any:
    """The normalised regular Hadamard matrix of ``size`` (cached per device and dtype)."""
    import torch

    return _hadamard(size, str(device), dtype or torch.float32)


def rotate(t: Any, group: int) -> Any:
    """``t`` with each run of ``group`` values along its last dimension multiplied by the Hadamard
    matrix: a weight's rotation, its undoing, and an input's rotation are all this one map."""
    features = t.shape[-1]
    if features % group:
        raise ValueError(f"{features} values do not split into ConvRot groups of {group}")
    h = hadamard(group, t.device, t.dtype)
    return (t.reshape(*t.shape[:-1], features // group, group) @ h).reshape(t.shape)
