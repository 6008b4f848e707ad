"""Model merging (ComfyUI's ModelMerge* and CLIPMerge* nodes) as weight patches.

A merge never builds a third model. Like a LoRA it is one entry on the first model's
patch stack (nodes.runtime.patches): while the merged model is in use, each weight the
two models share becomes ``own * W1 + other * W2`` (ComfyUI's ``add_patches(..., strength_patch=
other, strength_model=own)``: ratio and 1 - ratio for a simple merge, 1 and 1 for an add,
m and -m for a subtract), and when the block ends the saved weights are copied back, so the
first model is bit-identical afterwards. W1 is the weight as the stack has it so far (LoRAs
loaded before the merge are in it), W2 the second model's with its own LoRAs applied, read
from that model while it is in use, and read from the weights as loaded: as ComfyUI's
``get_key_patches`` takes a model's unpatched weight plus its own patches, so
``ModelMergeSubtract(model + LoRA, model)`` is the LoRA's delta, though both handles share one
network whose weights hold the LoRA at that moment.

Both models must hold their weights whole in memory while the merge is applied: a model
paged to disk or stored in fp8 is refused with the reason.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch


class NotWhole(ValueError):
    """A model's weights are not whole in memory (paged to disk, or stored in fp8): the reason."""


@dataclass(frozen=True)
class Blend:
    """One shared weight of a merge: ``own * W1 + other * W2``."""

    own: float
    other: float

    def mixed(self, weight: "torch.Tensor", other_weight: "torch.Tensor") -> "torch.Tensor":
        import torch

        mine = weight.to(torch.float32)
        theirs = other_weight.to(weight.device, torch.float32)
        return mine * self.own + theirs * self.other


def table(names: dict[str, tuple], other: dict[str, tuple], ratio_of: Callable[[str], tuple[float, float]],
          skip: Callable[[str], bool] = lambda name: False) -> tuple[dict[str, Blend], list[str]]:
    """The Blend patch of every weight both networks have with the same shape (by name ->
    shape maps), and the names whose shapes differ (left as the first model's, as ComfyUI
    leaves them). ``ratio_of(name)`` gives (own, other) for a weight."""
    patches, differing = {}, []
    for name, shape in names.items():
        if name not in other or skip(name):
            continue
        if other[name] != shape:
            differing.append(name)
            continue
        patches[name] = Blend(*ratio_of(name))
    return patches, differing


def not_whole(module: Any, names: list[str]) -> str:
    """Why ``module``'s weights ``names`` cannot be read or written as they are ("" when they can):
    paged to disk (placeholders rest in the module) or stored narrower than it computes (fp8)."""
    from nodes.runtime.fp8 import stored_apart
    from nodes.runtime.offload import offloaded

    if getattr(offloaded(module), "paged", False):
        return "paged to disk"
    params = dict(module.named_parameters())
    if any(stored_apart(params[name], module) for name in names):
        return "stored in fp8 or another narrow type"
    return ""


@contextlib.contextmanager
def other_weights(source: Callable[[], contextlib.AbstractContextManager], module: Any, names: list[str],
                  as_loaded: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  ) -> Iterator[dict[str, "torch.Tensor"]]:
    """The second model's weights ``names`` while the block runs, read with that model in use.

    ``as_loaded`` puts ``module``'s weights back as loaded while the second model is entered (and
    its own LoRAs and merges applied), then as the first model's stack had them: the second model
    may be ``module`` itself, or a merge reading it, and must not see the first model's patches.
    When the second model is the first one's very network (a checkpoint merged with itself,
    with other LoRAs), its weights are copied out before the first model's are written, since
    entering and leaving it would otherwise patch and restore the tensors being merged.
    Raises :class:`NotWhole` with the reason when they are not whole in memory."""
    with contextlib.ExitStack() as stack:
        with as_loaded():
            network = stack.enter_context(source())
            reason = not_whole(network, names)
            if reason:
                raise NotWhole(reason)
            params = dict(network.named_parameters())
            weights = {name: params[name] for name in names}
            if network is module:
                weights = {name: t.detach().to("cpu", copy=True) for name, t in weights.items()}
                stack.close()
        yield weights
