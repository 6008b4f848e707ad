"""Block-by-block (group) offloading of a denoiser too big for the memory it must run in.

FLUX's transformer is 24 GB in bf16 (12 GB in fp8): on a 24 GB GPU beside the VAE and the
activations, or on a CPU host with less free RAM than that, it cannot be resident whole.
The model manager (nodes.runtime.models) then places it with diffusers' block-level group
offloading (``diffusers.hooks.apply_group_offloading``): each top-level block (a FLUX
double or single block, an SD UNet's down/up block) is brought to the compute device just
before it runs and sent back right after, so only one block's weights are on the device
at a time. Where the weights rest:

* ``"cpu"`` (a GPU host): in CPU memory; each step copies every block over the bus.
* ``"disk"`` (a CPU host whose RAM budget is too small): in one safetensors file per block
  under a private temporary folder; each step reads every block back (the page cache makes
  repeated reads cheap while memory allows, and the kernel may drop them when it does not).

Non-stream mode only: stream mode copies the weights into pinned buffers at set-up, so a
LoRA patched into the module's weights afterwards would never reach the device. In memory
mode the weights at rest are the module's own CPU tensors, so Kiln's in-place LoRA patches
(nodes.runtime.patches) still apply: each block's device copy is taken from them. In disk
mode the tensors at rest are empty placeholders (the values live in the files), so every
linear layer becomes a CastLinear (nodes.runtime.fp8: same arithmetic for a non-fp8
weight) and LoRAs run beside the weight, as they do for fp8 weights.

Because the weights rest off the device, ``module.device`` (the first parameter's) no longer
says where the module computes: :func:`compute_device` is the one place that answers it.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

#: The values of ``--offload`` (and ModelManager's ``offload_mode``).
MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Offloaded:
    """How a module is offloaded: where it computes, where its weights rest, and the user's note."""

    onload: str
    rest: str  # "cpu" or "disk"
    folder: str | None
    note: str

    @property
    def paged(self) -> bool:
        """Whether the module's tensors at rest are placeholders (the values are on disk)."""
        return self.rest == "disk"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"offload must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def rest_for(mode: str, module_bytes: int, free_bytes: int, *, gpu: bool) -> str | None:
    """Where a denoiser's weights rest between blocks, or None when it is placed whole.

    ``free_bytes``: the room for weights on the compute device (a GPU) or in the host's RAM
    budget (a CPU host), after the least recently used idle modules were offloaded and
    without what must stay. "on" forces offloading (``--offload on``), "off" never offloads.
    A GPU host rests the blocks in CPU memory; a CPU host, whose RAM is the short memory, on disk.
    """
    if mode == "off" or (mode == "auto" and module_bytes <= free_bytes):
        return None
    return "cpu" if gpu else "disk"


def note(rest: str, module_bytes: int, free_bytes: int, forced: bool) -> str:
    from engine.budget import format_bytes

    where = "CPU memory" if rest == "cpu" else "a temporary folder on disk"
    why = ("--offload on" if forced else
           f"{format_bytes(module_bytes)} does not fit {format_bytes(max(0, free_bytes))} free")
    return (f"offloading the denoiser block by block ({why}): its weights rest in {where} and each block "
            "is brought in as it runs; expect slower steps")


def offload_blocks(module: Any, onload: str, rest: str, note_text: str, folder_root: str | None = None) -> Offloaded:
    """Place ``module`` with diffusers' block-level group offloading (one block per group, no streams).

    ``rest``: "cpu" or "disk" (see the module docstring). The disk folder is private to this
    module (block files of two models of one class have the same names) and is removed when
    the module is garbage-collected.
    """
    import torch
    from diffusers.hooks import apply_group_offloading

    folder = None
    if rest == "disk":
        from nodes.runtime.fp8 import as_cast_linear

        for sub in module.modules():  # LoRAs must run beside the weights (see the module docstring)
            if type(sub) is torch.nn.Linear:
                as_cast_linear(sub)
        folder = tempfile.mkdtemp(prefix="kiln-offload-", dir=folder_root)
        weakref.finalize(module, shutil.rmtree, folder, True)
    module.to("cpu")
    apply_group_offloading(module, onload_device=torch.device(onload), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=False,
                           offload_to_disk_path=folder)
    info = Offloaded(onload=onload, rest=rest, folder=folder, note=note_text)
    module.kiln_offload = info
    return info


def offloaded(module: Any) -> Offloaded | None:
    """The offload placement of ``module`` (or of the network a family wrapper holds), or None."""
    info = getattr(module, "kiln_offload", None)
    if info is None:
        inner = getattr(module, "transformer", None)
        info = getattr(inner, "kiln_offload", None) if inner is not None else None
    return info


def say_if_offloaded(network: Any, message: Any) -> None:
    """Tell the user (``message``: a node's ctx.message) that ``network`` runs block by block."""
    info = offloaded(network)
    if info is not None:
        message(info.note)


def compute_device(module: Any) -> Any:
    """The device ``module`` computes on: its onload device when offloaded, else ``module.device``."""
    info = offloaded(module)
    if info is None:
        device = getattr(module, "device", None)
        if device is not None:
            return device
        return next(iter(module.parameters())).device
    import torch

    return torch.device(info.onload)
