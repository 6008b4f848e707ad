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
weight) and LoRAs run beside the weight, as they do for fp8 weights; 2-D convolutions and
group/layer/RMS norms add their patches to the weight brought in, while they run. Other layers
(embeddings) cannot take a LoRA there: a clear error says so.

Offloading is not for life: the model manager asks its rule again at every use, and a denoiser
that fits again is made whole (:func:`make_whole`), its block files deleted.

Because the weights rest off the device, ``module.device`` (the first parameter's) no longer
says where the module computes: :func:`compute_device` is the one place that answers it.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from pathlib import Path
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


@dataclass(frozen=True)
class Plan:
    """The manager's decision for a denoiser not yet placed (ModelManager.offload_plan): where its
    blocks will rest, where it computes, the user's note and the disk folders' parent (None: the
    system's temporary folder). A loader given a "disk" plan builds the model straight into its
    resting blocks (nodes.checkpoint.flux_blocks) instead of whole."""

    onload: str
    rest: str
    note: str
    folder_root: str | None = None


def prepare_paged(module: Any, folder_root: str | None = None) -> str:
    """Ready ``module`` for disk mode: every linear layer a CastLinear, every 2-D convolution, group
    and layer norm its run-time-patched class (fp8.as_run_time_patched) (LoRAs must run beside the
    paged weights, see the module docstring) and a private block folder, removed with the module.
    Works on a module still on the meta device (only classes change). Returns the folder."""
    import torch

    from nodes.runtime.fp8 import as_cast_linear, as_run_time_patched

    for sub in module.modules():
        if type(sub) is torch.nn.Linear:
            as_cast_linear(sub)
        else:
            as_run_time_patched(sub)
    folder = tempfile.mkdtemp(prefix="kiln-offload-", dir=folder_root)
    _REMOVALS[folder] = weakref.finalize(module, _remove_folder, folder)
    return folder


#: Block folder -> the finaliser that removes it with its module (:func:`make_whole` runs it early).
_REMOVALS: dict[str, Any] = {}


def _remove_folder(folder: str) -> None:
    _REMOVALS.pop(folder, None)
    shutil.rmtree(folder, True)


def offload_blocks(module: Any, onload: str, rest: str, note_text: str, folder_root: str | None = None,
                   folder: str | None = None) -> Offloaded:
    """Place ``module`` with diffusers' block-level group offloading (one block per group, no streams).

    ``rest``: "cpu" or "disk" (see the module docstring). The disk folder is private to this
    module (block files of two models of one class have the same names) and is removed when
    the module is garbage-collected. ``folder``: one :func:`prepare_paged` made, whose block
    files :func:`rest_block_on_disk` already wrote (a model loaded straight into its blocks):
    diffusers then keeps those files and writes only the parts outside the blocks.
    """
    import torch
    from diffusers.hooks import apply_group_offloading

    if rest == "disk" and folder is None:
        folder = prepare_paged(module, folder_root)
    written = set(Path(folder).iterdir()) if folder is not None else set()
    module.to("cpu")
    apply_group_offloading(module, onload_device=torch.device(onload), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=False,
                           offload_to_disk_path=folder if rest == "disk" else None, block_modules=nested(module) or None)
    if written:
        _check_prewritten(module, written)
    info = Offloaded(onload=onload, rest=rest, folder=folder if rest == "disk" else None, note=note_text)
    module.kiln_offload = info
    return info


def make_whole(module: Any) -> None:
    """Undo :func:`offload_blocks`: ``module`` is whole in CPU memory again, as if never offloaded
    (the model manager calls this when it fits again, ModelManager._fit_denoiser).

    When paged, each of diffusers' groups is read back once from its block file (resting in CPU
    memory, the values are already there), then the hooks are removed, the layers
    :func:`prepare_paged` changed go back to their torch classes (fp8.as_plain), so LoRAs are
    patched in place again, and the block folder is deleted now rather than when the module dies:
    kept, it would duplicate the whole model on disk while the RAM holds it, and if memory runs
    short again the files are simply written again from the (unchanged: patches are always
    restored exactly) weights, as on the first offload. Must not run while the module computes.
    """
    from diffusers.hooks import HookRegistry

    info = module.kiln_offload
    hooked = [m for m in module.modules() if getattr(m, "_diffusers_hook", None) is not None]
    groups = {}
    for m in hooked:
        hook = m._diffusers_hook.get_hook("group_offloading")
        if hook is not None:
            groups[id(hook.group)] = hook.group
    for group in groups.values() if info.paged else ():  # resting in CPU memory, the values are there already
        group.onload_()  # from its file to where it computes (a CPU host: only there are models paged)
        # diffusers reads a block file through a memory map: the values get memory of their own, or the
        # deleted files would keep their disk space (and the weights be paged in from it)
        for t in _tensors(group):
            t.data = t.data.clone()
    HookRegistry.check_if_exists_or_initialize(module).remove_hook("group_offloading", recurse=True)
    for m in set(hooked) | {module}:
        if not m._diffusers_hook.hooks:
            del m._diffusers_hook
        bound = vars(m).get("forward")  # removing a hook leaves the class's forward bound on the instance
        if getattr(bound, "__self__", None) is m and getattr(bound, "__func__", None) is type(m).forward:
            del m.forward
    if info.paged:
        from nodes.runtime.fp8 import as_plain

        for sub in module.modules():
            as_plain(sub, module)
        removal = _REMOVALS.get(info.folder)
        if removal is not None:
            removal()
    del module.kiln_offload


def _tensors(group: Any) -> list[Any]:
    """The parameters and buffers one diffusers ModuleGroup brings in and sends back."""
    out = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
    return out + list(group.parameters) + list(group.buffers)


def _lists(module: Any) -> list[tuple[str, Any]]:
    import torch

    return [(name, child) for name, child in module.named_children()
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))]


def nested(module: Any) -> list[str]:
    """Direct children that are not block lists themselves but hold some (a UNet's ``mid_block``): given
    to diffusers as ``block_modules``, so their blocks are paged one by one too. Otherwise such a
    child joins the group of everything outside the blocks, which is brought in for the whole forward
    (SDXL's mid block, ten transformer layers at 1280 channels, would then stay in memory throughout)."""
    import torch

    return [name for name, child in module.named_children()
            if not isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and _lists(child)]


def blocks(module: Any) -> list[tuple[str, int, Any]]:
    """The blocks diffusers' block-level offloading pages one by one: (list name, index, block) for each
    entry of a top-level ModuleList/Sequential, in its order, then those of the :func:`nested` children
    (list name ``child.list``). Everything else stays in one group."""
    out = [(name, i, block) for name, child in _lists(module) for i, block in enumerate(child)]
    for outer in nested(module):
        out += [(f"{outer}.{name}", i, block) for name, child in _lists(getattr(module, outer))
                for i, block in enumerate(child)]
    return out


def _group(block: Any, name: str, index: int, onload: str, folder: str) -> Any:
    """The diffusers ModuleGroup that block-level offloading makes for this block (its file name and the
    order of its tensors in that file come from the group id and the block's own tensor order; a
    nested child's lists are named ``child.list``, the prefix diffusers gives their group ids)."""
    import torch
    from diffusers.hooks.group_offloading import ModuleGroup

    return ModuleGroup(modules=[block], offload_device=torch.device("cpu"), onload_device=torch.device(onload),
                       offload_leader=block, onload_leader=block, offload_to_disk_path=folder,
                       group_id=f"{name}_{index}_{index}")


def rest_block_on_disk(block: Any, name: str, index: int, onload: str, folder: str) -> None:
    """Write one materialised block to its block file, as diffusers' disk mode would, and drop its values
    (its tensors become unbacked placeholders). Loading straight into blocks calls this block after
    block, so the whole weight set is never in memory at once.

    Why not diffusers alone: its disk mode writes each group from the module's live tensors when the
    hooks are applied, so the whole model must be materialised first. Its groups skip a file that
    already exists, so Kiln writes each block's file itself through diffusers' own ModuleGroup (same
    file name, same tensor keys), one block at a time, then applies the hooks; :func:`offload_blocks`
    checks that every block's group found the file written here.
    """
    _group(block, name, index, onload, folder).offload_()


def _check_prewritten(module: Any, written: set) -> None:
    missing = []
    for name, i, block in blocks(module):
        hook = getattr(block, "_diffusers_hook", None)
        group = hook.get_hook("group_offloading").group if hook is not None else None
        if group is None or Path(group.safetensors_file_path) not in written:
            missing.append(f"{name}.{i}")
    if missing:  # a diffusers upgrade named its groups differently: the placeholders would be written
        raise RuntimeError(f"group offloading did not find the block files written while loading for {missing[:3]}; "
                           "nodes.runtime.offload._group must follow diffusers' group ids")


def offloaded(module: Any) -> Offloaded | None:
    """The offload placement of ``module`` (or of the network a family wrapper exposes as
    ``kiln_network``, see Family.wrap_network), or None."""
    info = getattr(module, "kiln_offload", None)
    if info is None:
        inner = getattr(module, "kiln_network", None)
        info = getattr(inner, "kiln_offload", None) if inner is not None else None
    return info


@contextlib.contextmanager
def outside_blocks(module: Any) -> Any:
    """The layers of a block-offloaded ``module`` outside its blocks brought to its onload device (read
    from their file when paged) for the ``with`` body, and sent back after it, as the hook on
    ``module``'s own forward does around a call; nothing for a module not offloaded. For a family
    wrapper that runs those layers itself rather than calling the module (JoyImage's): without it they
    would compute on their resting placeholders (a paged build's are unfilled memory)."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("group_offloading") if registry is not None else None
    if hook is None or hook.group.onload_leader is not module:
        yield
        return
    hook.group.onload_()
    try:
        yield
    finally:
        hook.group.offload_()


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
