"""DoRA (weight-decomposed LoRA): a module's LoRA/LoHa/LoKr difference plus a ``dora_scale``.

Facts as ComfyUI (comfy/weight_adapter/base.py ``weight_decompose``), LyCORIS and peft apply
them (own code, none copied). With ΔW the module's difference already times ``alpha / rank``
and ``m`` the file's ``dora_scale``, the decomposed weight is ``W' = m * (W + ΔW) / (‖W + ΔW‖ + eps)``
(eps: float32's machine epsilon, as ComfyUI adds it), and strength ``s`` gives
``W + s * (W' - W)`` (so 0 is the base; ComfyUI writes ``W'`` itself at 1, and so does Kiln).

The norm's axis follows the magnitude's shape, ComfyUI's rule: ``dora_scale`` with as many rows
as the weight (``[out, 1, ...]``, LyCORIS' ``wd_on_out``; peft's magnitudes are per output row
too) takes one norm per OUTPUT row (over the input and kernel axes); any other (``[1, in, 1, 1]``,
LyCORIS' default) one norm per INPUT channel (over the output and kernel axes). peft's own
key (``lora_magnitude_vector``: ``[out]``, ``[1, out, 1, 1]`` for a conv) is always per output row,
as peft computes it (nodes.lora_keys reads the key to decide). On the output
axis ComfyUI's current code divides by the norm of the base ``W``, not of ``W + ΔW``; its open
PR #15458 calls that a bug, and peft, LyCORIS and the DoRA paper all normalise ``W + ΔW``, so
Kiln does too (a LoRA trained by any of them is then applied as trained).

The decomposition needs the weight itself, so a :class:`Dora` has no weight-free ``delta``:
the patch path asks it for the whole new weight (:meth:`Dora.apply`), in place where the weight
is held, and from the weight read per call where patches run beside the weight (fp8, kept narrow,
disk-paged: nodes.runtime.fp8's ``kiln_deltas``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def axis(scale_shape: tuple, weight_shape: tuple) -> str | None:
    """"out" or "in" by the rule above, or None when ``dora_scale`` fits neither axis."""
    numel = 1
    for d in scale_shape:
        numel *= d
    if scale_shape and scale_shape[0] == weight_shape[0] and numel == weight_shape[0]:
        return "out"
    if len(weight_shape) > 1 and numel == weight_shape[1] and (not scale_shape or scale_shape[0] in (1, numel)):
        return "in"
    return None


@dataclass(frozen=True, eq=False)
class Dora:
    """A DoRA patch for one weight: ``inner`` (a LowRank or lycoris.Product) gives ΔW, ``magnitude``
    is the file's ``dora_scale`` (for a fused module's piece: its rows), ``on`` "out" or "in"."""

    inner: Any
    magnitude: Any
    on: str

    def apply(self, weight: Any, strength: float) -> Any:
        """The float32 weight this patch makes of ``weight`` at ``strength`` (a new tensor)."""
        import torch

        w = weight.to(torch.float32)
        merged = w + self.inner.delta(tuple(w.shape), w.device)
        if self.on == "out":
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        else:
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
        m = self.magnitude.to(w.device, torch.float32).reshape(norm.shape)
        decomposed = merged * (m / (norm + torch.finfo(torch.float32).eps))
        return decomposed if strength == 1.0 else w + strength * (decomposed - w)
