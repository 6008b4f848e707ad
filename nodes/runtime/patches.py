"""Weight patches (LoRA) applied while a model is in use, removed exactly afterwards.

A LoRA never gets its own copy of a model. While a network is in use for one
job (``with patched(...)``), each patched weight is saved to the CPU, the LoRA
deltas are added in place, and when the block ends the saved tensors are copied
back: the base model is bit-identical afterwards, whatever stack was applied, and
two jobs with different stacks alternate on one copy of the weights. Only the
patched weights are saved, and only for the duration of the block.

A delta is ``strength * scale * (up @ down)`` reshaped to the weight (LoCon's
convolution factors flatten the same way); ``scale`` is the file's
``alpha / rank`` (1 when the file has no alpha, as diffusers/PEFT files do).
A full difference (:class:`Diff`: a file's ``.diff`` for a weight, ``.diff_b`` for a
bias, a LoRA's own bias) is ``strength * scale * diff``, on the same path.
A LyCORIS LoHa or LoKr module (:class:`nodes.runtime.lycoris.Product`) rebuilds its
difference from its factors on the same path. A DoRA module (:class:`nodes.runtime.dora.Dora`:
one of those plus the file's ``dora_scale``) needs the weight itself: it gives the whole new
weight (``apply``), written into the parameter on the same path.
A file module that is only some rows of a parameter (:class:`Stacked`: Ovis-Image's separate up and
gate projections, one fused weight in diffusers) patches those rows, the file's other such modules
joining it. An entry at strength 0 is skipped, so it equals no LoRA byte for byte.

A weight stored in fp8 (nodes.runtime.fp8, FLUX's fp8 files) is not touched: rounding
``weight + delta`` back to fp8 would lose most of a LoRA's small delta. Its layer gets
the factors instead (``kiln_lora``) and adds ``strength * scale * (x @ down.T) @ up.T``
to its output while the block lasts; the attribute is removed afterwards. The same holds for
every linear layer of a model whose blocks are paged to disk (nodes.runtime.offload): its
resting weights are placeholders, so a delta added into them would never run. Its
convolutions and norms get their patches instead (``kiln_deltas``) and add the same delta to
the weight brought in from disk while they run (fp8.as_run_time_patched).

A float32 weight takes its delta with ``add_`` (bit-identical to adding into a
copy, without the weight-sized temporary). ``addmm_`` with ``alpha = scale *
strength`` would save the delta tensor too, but it rounds once where the delta
rounds twice (``(up @ down) * scale * strength``) and the GEMM may sum in another
order, so its weights differ in the last bits: not used.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LowRank:
    """One module's factors: ``up`` [out, rank, ...] and ``down`` [rank, in, ...]."""

    up: "torch.Tensor"
    down: "torch.Tensor"
    scale: float

    def delta(self, shape: tuple[int, ...], device: Any) -> "torch.Tensor":
        import torch

        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.scale

    def beside(self, device: Any, coefficient: float) -> tuple:
        """The layer-side form (``CastLinear.kiln_lora``): ``coefficient * (x @ down.T) @ up.T``."""
        import torch

        return (self.up.to(device, torch.float32).flatten(1), self.down.to(device, torch.float32).flatten(1),
                coefficient * self.scale)


@dataclass(frozen=True)
class Diff:
    """A whole difference for one parameter: ``scale * diff`` is added to it.

    Files carry these beside their factor pairs: ``<layer>.diff`` (a full weight
    difference, LyCORIS' "full" modules), ``<layer>.diff_b`` (a bias difference) and a
    LoRA's own bias (PEFT's ``lora_B.bias``, BFL's control LoRAs), which adds to the bias
    the way ``up @ down`` adds to the weight. ``scale``: the file's ``alpha / rank`` for a
    LoRA bias (PEFT scales its whole ``lora_B`` output), 1 otherwise.
    """

    diff: "torch.Tensor"
    scale: float = 1.0

    def delta(self, shape: tuple[int, ...], device: Any) -> "torch.Tensor":
        import torch

        return self.diff.to(device, torch.float32).reshape(shape) * self.scale

    def beside(self, device: Any, coefficient: float) -> tuple:
        """The layer-side form: a weight difference as ``(diff, None, c)`` (``c * x @ diff.T``), a bias
        difference as ``(diff, "bias", c)`` (``c * diff`` added to the output). Only linear layers run
        patches beside, so the rank tells the two apart: their weights are 2-D, their biases 1-D."""
        import torch

        diff = self.diff.to(device, torch.float32)
        return (diff, "bias" if diff.ndim == 1 else None, coefficient * self.scale)


@dataclass(frozen=True)
class Scale:
    """A parameter multiplied by ``factor`` (ComfyUI's attention-multiply nodes). Like DoRA it gives
    the whole new weight (``apply``), so it runs on every path a DoRA module does (fp8, paged)."""

    factor: float

    def apply(self, weight: "torch.Tensor", strength: float) -> "torch.Tensor":
        return weight * (1.0 + strength * (self.factor - 1.0))


@dataclass(frozen=True, eq=False)
class Stacked:
    """Patches for row ranges of one parameter, nothing elsewhere: ``parts`` ((start, stop, patch), ...),
    disjoint. A file module that is part of a model parameter (nodes.checkpoint.flux_keys.Into: Ovis-Image's
    up and gate projections in ComfyUI's layout, one fused MLP input in diffusers') gets one part, and the
    file's modules on the other rows join it (:meth:`joined`). ``shape``: the whole parameter's. Made by
    :func:`stacked`, which gives a DoRA part's form (:class:`StackedWhole`) where one needs the weight."""

    shape: tuple
    parts: tuple

    def delta(self, shape: tuple[int, ...], device: Any) -> "torch.Tensor":
        import torch

        out = torch.zeros(shape, dtype=torch.float32, device=device)
        for a, b, patch in self.parts:
            out[a:b] = patch.delta((b - a, *shape[1:]), device)
        return out

    def beside(self, device: Any, coefficient: float) -> tuple:
        """The layer-side form: a bias as one difference; LoRA pairs as one pair of block factors (each
        part's ``up`` times its scale in its rows and its own columns, the ``down`` factors stacked), so
        ``x @ down.T @ up.T`` gives each part its rows; anything else rebuilt per call as LyCORIS is."""
        import torch

        if len(self.shape) == 1:
            return (self.delta(self.shape, device), "bias", coefficient)
        if not all(isinstance(p, LowRank) for _, _, p in self.parts):
            return (self, "product", coefficient)
        ranks = [p.down.flatten(1).shape[0] for _, _, p in self.parts]
        up = torch.zeros(self.shape[0], sum(ranks), dtype=torch.float32, device=device)
        start = 0
        for (a, b, p), r in zip(self.parts, ranks):
            up[a:b, start:start + r] = p.up.to(device, torch.float32).flatten(1) * p.scale
            start += r
        down = torch.cat([p.down.to(device, torch.float32).flatten(1) for _, _, p in self.parts])
        return (up, down, coefficient)

    def joined(self, other: "Stacked") -> "Stacked | None":
        """Both patches' parts on one parameter, or None when their rows overlap."""
        parts = sorted(self.parts + other.parts, key=lambda part: part[0])
        if any(parts[i][1] > parts[i + 1][0] for i in range(len(parts) - 1)):
            return None
        return stacked(self.shape, tuple(parts))


@dataclass(frozen=True, eq=False)
class StackedWhole(Stacked):
    """A :class:`Stacked` with a DoRA part: like DoRA it gives the whole new weight (each DoRA part its
    rows from the rows of the weight, nodes.runtime.dora), so it runs on every path a DoRA module does."""

    def apply(self, weight: "torch.Tensor", strength: float) -> "torch.Tensor":
        import torch

        w = weight.to(torch.float32).clone()
        for a, b, patch in self.parts:
            if hasattr(patch, "apply"):
                w[a:b] = patch.apply(w[a:b], strength)
            else:
                w[a:b] += patch.delta(tuple(w[a:b].shape), w.device) * strength
        return w


def stacked(shape: tuple, parts: tuple) -> Stacked:
    """A :class:`Stacked` of these parts, the :class:`StackedWhole` form when one of them needs the weight."""
    return (StackedWhole if any(hasattr(p, "apply") for _, _, p in parts) else Stacked)(tuple(shape), tuple(parts))


Patch = Any  # LowRank | Diff | Scale | lycoris.Product | dora.Dora | Stacked: what a table holds per parameter


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One LoRA in a stack: per target ("unet", "text_encoder", ...) the patch by parameter name.

    A merge (nodes.runtime.merge) is an entry too: its patches are ``merge.Blend`` and
    ``sources`` gives, per target, the second model's network in use (a context manager)."""

    name: str
    strength: float
    tables: dict[str, dict[str, Patch]] = field(default_factory=dict)
    sources: dict[str, Callable[[], contextlib.AbstractContextManager]] = field(default_factory=dict)


LoraStack = tuple  # tuple[LoraEntry, ...]


@contextlib.contextmanager
def patched(module: Any, stack: LoraStack, target: str) -> Iterator[None]:
    """Apply ``stack``'s deltas for ``target`` (its parameter names) to ``module`` for the block."""
    active = [(e, e.tables[target]) for e in stack if e.strength != 0.0 and e.tables.get(target)]
    if not active:
        yield
        return
    import torch

    from nodes.runtime.fp8 import stored_apart
    from nodes.runtime.offload import compute_device, offloaded

    params = dict(module.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    beside: dict[str, list] = {}  # fp8 / narrow-stored layers: owner module name -> (kind, patch, strength)
    deltas: dict[str, list] = {}  # paged convolutions/norms: owner -> (kind, patch, strength)
    # Weights paged to disk (nodes.runtime.offload) rest as placeholders: every LoRA runs beside.
    paged = getattr(offloaded(module), "paged", False)
    device = compute_device(module)  # where the layer runs (an offloaded weight rests elsewhere)
    try:
        with torch.no_grad():
            for entry, table in active:
                if target in entry.sources:
                    _merge(module, params, entry, table, target, saved)
                    continue
                for name, factors in table.items():
                    p = params[name]
                    owner, kind = name.rsplit(".", 1)
                    if paged and hasattr(module.get_submodule(owner), "kiln_deltas"):  # fp8.as_run_time_patched
                        deltas.setdefault(owner, []).append((kind, factors, entry.strength))
                        continue
                    if (paged or stored_apart(p, module)) and hasattr(module.get_submodule(owner), "kiln_lora"):
                        beside.setdefault(owner, []).append((kind, factors, entry.strength))
                        continue
                    if paged:  # only a denoiser is paged, so the input at fault is the model
                        from engine.context import NodeError

                        raise NodeError(f"LoRA {entry.name}: its {owner} is not a linear, convolution or norm layer, "
                                        "and this model's weights are offloaded to disk, where only those layers "
                                        "take a LoRA "
                                        "(give Kiln more memory, or leave this LoRA out)", "model")
                    if name not in saved:
                        saved[name] = p.detach().to("cpu", copy=True)
                    if hasattr(factors, "apply"):  # DoRA (nodes.runtime.dora): the new weight from the weight
                        p.copy_(factors.apply(p, entry.strength).to(p.dtype))
                        continue
                    delta = factors.delta(tuple(p.shape), p.device) * entry.strength
                    if p.dtype == torch.float32:  # in place: the same single rounding, no weight-sized temporary
                        p.add_(delta)
                    else:
                        p.copy_((p.to(torch.float32) + delta).to(p.dtype))
            for owner, items in beside.items():
                if any(hasattr(factors, "apply") for _, factors, _ in items):
                    deltas[owner] = items  # DoRA needs the weight itself: the layer builds it per call
                else:
                    module.get_submodule(owner).kiln_lora = tuple(f.beside(device, s) for _, f, s in items)
            for owner, items in deltas.items():
                module.get_submodule(owner).kiln_deltas = tuple(items)
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original.to(params[name].device))
        for owner in beside:
            vars(module.get_submodule(owner)).pop("kiln_lora", None)
        for owner in deltas:
            vars(module.get_submodule(owner)).pop("kiln_deltas", None)


def _merge(module: Any, params: dict, entry: LoraEntry, table: dict, target: str, saved: dict) -> None:
    """Write a merge entry's blends into ``module`` (nodes.runtime.merge), saving what it overwrites."""
    from engine.context import NodeError
    from nodes.runtime.merge import NotWhole, not_whole, other_weights

    def refuse(reason: str) -> NodeError:
        return NodeError(f"{entry.name}: merging needs both models' weights whole in memory, and some are {reason} "
                         "(give Kiln more memory, or merge full-precision files)",
                         "model" if target == "unet" else "clip")

    reason = not_whole(module, list(table))
    if reason:
        raise refuse(reason)
    try:
        with other_weights(entry.sources[target], module, list(table), lambda: _as_loaded(params, saved)) as other:
            for name, blend in table.items():
                p = params[name]
                if name not in saved:
                    saved[name] = p.detach().to("cpu", copy=True)
                p.copy_(blend.mixed(p, other[name]).to(p.dtype))
    except NotWhole as exc:
        raise refuse(str(exc)) from None


@contextlib.contextmanager
def _as_loaded(params: dict, saved: dict) -> Iterator[None]:
    """The module's weights as loaded while the block runs (``saved``: the originals of those the stack's
    earlier entries changed), then as those entries left them. A merge reads its second model inside: when
    that is a handle of this very network (a LoRA'd model merged with itself without the LoRA), entering it
    would otherwise find the first handle's LoRAs already written in, and a difference of the two be zero."""
    if not saved:
        yield
        return
    current = {name: params[name].detach().to("cpu", copy=True) for name in saved}
    try:
        for name, original in saved.items():
            params[name].copy_(original.to(params[name].device))
        yield
    finally:
        for name, value in current.items():
            params[name].copy_(value.to(params[name].device))
