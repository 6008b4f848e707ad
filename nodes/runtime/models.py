"""The model manager (the node library's engine.context.ModelHost): each model loaded once, placed on the best device, offloaded when memory runs short.

The engine knows nothing about diffusion: a loader callable from the node library
builds the model (any object; typically a dict of named torch modules) and the
manager stores it under a key (a file's real path, mtime and size, plus a kind),
so two nodes that load the same file share one copy. Torch modules inside the
stored object are the unit of placement: :meth:`ModelManager.use` moves one to the
compute device for the duration of a ``with`` block and leaves it there afterwards
(the next job is likely to need it), until room is needed for another, when the
least recently used idle modules go back to the CPU. A denoiser that does not fit whole
is placed block by block instead (nodes.runtime.offload). Entries beyond the CPU memory
budget are dropped entirely, least recently used first; handles that still refer
to them reload on demand, because every access goes through :meth:`acquire` with
the loader.

Constructing a manager is cheap and imports nothing heavy: torch is imported the
first time a model is loaded or a device is asked for.
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from nodes.runtime.measure import held_bytes, module_bytes, module_device, modules_of, physical_memory

#: accelerate's ``init_empty_weights`` (used by Kiln's checkpoint loader and inside diffusers'
#: ``from_pretrained``) patches ``torch.nn.Module`` for the whole process while it runs. Two lanes
#: loading at once would interleave the patch and its undo and leave it in place (every module
#: built afterwards on "meta"), so loads take turns process-wide; sampling still runs in parallel.
_LOAD_LOCK = threading.Lock()

#: Memory left free on the compute device for activations, beyond the weights.
DEFAULT_DEVICE_RESERVE = 1536 * 1024**2


#: Modules that leave the compute device the moment their use ends, when memory is short
#: (see :func:`leaves_after_use`): text encoders run once per prompt, the denoiser then runs
#: for every step and needs the room.
LEAVE_AFTER_USE = ("text_encoder",)


#: The module a model's denoiser is stored under: the one placed block by block when it does
#: not fit (nodes.runtime.offload), whatever the family.
DENOISER = "unet"


def leaves_after_use(name: str, free_bytes: int, pending_bytes: int) -> bool:
    """Whether module ``name`` goes back to the CPU as soon as its use ends.

    Only text encoders (names starting with :data:`LEAVE_AFTER_USE`) and only when memory
    is short: ``free_bytes`` (room left on the device for weights, the activation reserve
    already taken off) would not hold ``pending_bytes`` (the same model's modules not yet
    on the device: the denoiser and VAE about to run), or the reserve itself is already
    eaten into. Otherwise the encoder stays, so the next prompt encodes without a
    transfer; if room is needed later, the LRU offload of :meth:`ModelManager._make_room`
    still moves it then.
    """
    return name.startswith(LEAVE_AFTER_USE) and free_bytes < pending_bytes


def file_key(path: str | os.PathLike[str], kind: str = "") -> tuple[str, str, int, int]:
    """Identity of a model file or folder: the same content under the same name shares an entry.

    A folder (a diffusers pipeline) is identified by its newest file, so editing any
    component reloads it.
    """
    real = Path(os.path.realpath(path))
    st = real.stat()
    mtime, size = st.st_mtime_ns, st.st_size
    if real.is_dir():
        for dirpath, _, files in os.walk(real):
            for name in files:
                fst = os.stat(os.path.join(dirpath, name))
                mtime, size = max(mtime, fst.st_mtime_ns), size + fst.st_size
    return (kind, str(real), mtime, size)


@dataclass
class _Entry:
    key: tuple
    value: Any
    modules: dict[str, Any]
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)
    in_use: dict[str, int] = field(default_factory=dict)  # module name -> active `use` blocks
    module_last_used: dict[str, float] = field(default_factory=dict)


class ModelManager:
    def __init__(self, device: str | None = None, *, device_reserve_bytes: int = DEFAULT_DEVICE_RESERVE,
                 cpu_budget_bytes: int | None = None, device_budget_bytes: int | None = None,
                 compile_mode: str = "off", compile_cache: str | os.PathLike[str] | None = None,
                 offload_mode: str = "auto", offload_folder: str | None = None, precision: str = "auto") -> None:
        from nodes.runtime import offload, precision as precisions
        from nodes.runtime.compiled import check_mode

        #: Block-by-block offloading of a denoiser that does not fit (nodes.runtime.offload):
        #: "auto" when short of memory, "on" always, "off" never (``--offload``).
        self.offload_mode = offload.check_mode(offload_mode)
        #: Where disk-offloaded blocks are written (None: the system's temporary folder).
        self.offload_folder = offload_folder
        #: The compute dtype's mode (nodes.runtime.precision, ``--precision``): "auto" is float16 on a GPU
        #: and float32 on a CPU; "fp32", "fp16" or "bf16" everywhere.
        self.precision = precisions.check_mode(precision)

        self._requested_device = device
        #: Compiled mode (nodes.runtime.compiled): "auto", "on" or "off"; "off" unless asked,
        #: so scripts and tests get the eager modules; the CLI and server pass ``--compile``.
        self.compile_mode = check_mode(compile_mode)
        self.compile_cache = compile_cache
        self._device: str | None = None
        self.device_reserve_bytes = device_reserve_bytes
        #: Weights kept in CPU memory at most (entries beyond it are unloaded, LRU first).
        self.cpu_budget_bytes = cpu_budget_bytes if cpu_budget_bytes is not None else int(physical_memory() * 0.6)
        #: Weights kept on the compute device at most; None = what the device reports free.
        self.device_budget_bytes = device_budget_bytes
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.RLock()
        self.counters = {"loads": 0, "hits": 0, "unloads": 0, "offloads": 0, "onloads": 0, "block_offloads": 0,
                         "made_whole": 0, "narrowed": 0, "parts": 0}

    @classmethod
    def for_settings(cls, device: str | None = None, settings: Any = None) -> "ModelManager":
        """The registry's model host factory: a manager for ``device`` with the settings' compiled mode,
        offloading and precision."""
        if settings is None:
            return cls(device=device)
        return cls(device=device, compile_mode=getattr(settings, "compile", "off"),
                   compile_cache=getattr(settings, "compile_cache", None),
                   offload_mode=getattr(settings, "offload", "auto"),
                   precision=getattr(settings, "precision", "auto"))

    # -- device and dtype ----------------------------------------------------------

    @property
    def device(self) -> str:
        """The compute device: the one asked for, else CUDA, then MPS, then the CPU."""
        if self._device is None:
            if self._requested_device:
                self._device = self._requested_device
            else:
                import torch

                if torch.cuda.is_available():
                    self._device = "cuda"
                elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                    self._device = "mps"
                else:
                    self._device = "cpu"
        return self._device

    def visible_devices(self) -> list[str]:
        """Every device a lane could use: each visible CUDA GPU, else this manager's device."""
        import torch

        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return [self.device]

    @property
    def is_gpu(self) -> bool:
        return not self.device.startswith("cpu")

    @property
    def dtype(self) -> Any:
        """The compute dtype of a load with no family (a VAE, a ControlNet; nodes.runtime.precision): by
        default float16 on a GPU and float32 on the CPU, where half precision is ~80x slower unless the CPU
        has native bfloat16."""
        return self.dtype_rule.for_family(None)

    @property
    def dtype_rule(self) -> Any:
        """The precision for a loader that learns the family from the file (nodes.runtime.precision.resolve):
        on a GPU, ``auto`` gives each family the first dtype it holds in that the GPU computes natively."""
        from nodes.runtime.precision import DtypeRule, gpu_computes_bf16

        return DtypeRule(self.precision, self.is_gpu, self.is_gpu and gpu_computes_bf16(self.device))

    def precision_note(self, family: Any = None) -> str:
        """For a loader's message ("" mostly): what ``--precision`` could give on this device, or why the dtype
        it forced may fail for ``family``."""
        from nodes.runtime.precision import note

        return note(self.precision, self.is_gpu) + self.dtype_rule.caution(family)

    # -- loading -------------------------------------------------------------------

    def acquire(self, key: tuple, loader: Callable[["ModelManager"], Any]) -> Any:
        """The object stored under ``key``, built by ``loader(self)`` if not held.

        The loader runs under the manager's lock, so two nodes asking for the same
        file at once still load it once.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.counters["hits"] += 1
                entry.last_used = time.monotonic()
                return entry.value
            with _LOAD_LOCK:
                value = loader(self)
            modules = modules_of(value)
            entry = _Entry(key, value, modules, sum(held_bytes(m) for m in modules.values()))
            from nodes.runtime.offload import offloaded

            # a loader that was given an offload plan built the denoiser straight into its blocks
            self.counters["block_offloads"] += sum(offloaded(m) is not None for m in modules.values())
            self._entries[key] = entry
            self.counters["loads"] += 1
            self._fit_cpu_budget(keep=key)
            return value

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._entries

    @contextlib.contextmanager
    def use(self, key: tuple, name: str, loader: Callable[["ModelManager"], Any],
            parts: tuple[str, ...] = ()) -> Iterator[Any]:
        """Yield module ``name`` of the entry on the compute device (loading the entry if needed).

        While the block runs the module is pinned: no other load offloads it. ``parts``: submodules the
        loader left to build on first use (nodes.runtime.deferred: a Qwen-VL's vision tower), built now
        where they still wait (:meth:`_grow`); a use that does not name them never builds them.
        """
        with self._lock:
            self.acquire(key, loader)
            entry = self._entries[key]
            module = entry.modules[name]
            entry.in_use[name] = entry.in_use.get(name, 0) + 1
            try:
                for part in parts:
                    self._grow(entry, module, part)
                self._place(entry, name, module)
            except BaseException:
                self._release(entry, name)
                raise
        try:
            yield module
        finally:
            with self._lock:
                self._release(entry, name)
                self._leave_if_short(entry, name, module)

    def _grow(self, entry: _Entry, module: Any, part: str) -> None:
        """Build ``module``'s deferred ``part`` if it still waits: its bytes join the entry's (the CPU budget
        is checked again), and where the module already sits on the compute device the part is moved
        there too, after room is made for it (the module itself is pinned by the use asking)."""
        from nodes.runtime import deferred

        if part not in deferred.pending(module):
            return
        where = module_device(module)  # before the build: the part may come first among its parameters
        with _LOAD_LOCK:  # a build makes its modules empty first, as a load does (see _LOAD_LOCK)
            built = deferred.build(module, part)
        if built is None:
            return
        entry.nbytes += held_bytes(built)
        self.counters["parts"] += 1
        if self.is_gpu and where != "cpu" and module_device(built) != where:
            self._make_room(module_bytes(built))
            built.to(where)
            self.counters["onloads"] += 1
        self._fit_cpu_budget(keep=entry.key)

    def _release(self, entry: _Entry, name: str) -> None:
        entry.in_use[name] -= 1
        if not entry.in_use[name]:
            del entry.in_use[name]
        now = time.monotonic()
        entry.last_used = entry.module_last_used[name] = now

    def _leave_if_short(self, entry: _Entry, name: str, module: Any) -> None:
        """A text encoder whose use ended goes back to the CPU when memory is short (:func:`leaves_after_use`)."""
        if not self.is_gpu or name in entry.in_use or not name.startswith(LEAVE_AFTER_USE):
            return
        if module_device(module) == "cpu":
            return
        pending = sum(module_bytes(m) for n, m in entry.modules.items() if n != name and module_device(m) == "cpu")
        if leaves_after_use(name, self._device_free(), pending):
            module.to("cpu")
            self.counters["offloads"] += 1
            self._empty_device_cache()

    def _place(self, entry: _Entry, name: str, module: Any) -> None:
        from nodes.runtime.offload import offloaded

        in_blocks = self._fit_denoiser(entry, module) if name == DENOISER else offloaded(module) is not None
        if in_blocks:
            return  # its blocks come to the device as they run
        if self.compiles():
            from nodes.runtime.compiled import compile_in_place, use_cache_dir

            use_cache_dir(self.compile_cache)
            compile_in_place(module, name)  # in place: moving it between devices keeps the compiled forward
        if module_device(module).split(":")[0] == self.device.split(":")[0]:
            return
        if self.is_gpu:
            self._make_room(module_bytes(module))
        module.to(self.device)
        self.counters["onloads"] += 1

    def offload_plan(self, nbytes: int, held_besides: int = 0) -> Any:
        """Whether a denoiser of ``nbytes`` is placed block by block, and where its blocks rest
        (a nodes.runtime.offload.Plan), or None when it is placed whole: the one rule, asked by a
        loader before it builds the model (from the file's header) and by :meth:`_fit_denoiser` at every
        use after (which also brings a denoiser placed block by block back whole when this says it fits).

        The room is, on a GPU, the device's free room plus what moving its idle modules to the
        CPU would free (nothing is moved to decide: if the denoiser goes block by block anyway,
        an eviction would be wasted); on a CPU host, the RAM budget less ``held_besides`` (every
        other module held, the same load's included)."""
        from nodes.runtime import offload

        with self._lock:
            if self.is_gpu:
                idle = sum(module_bytes(e.modules[n]) for _, e, n in self._device_resident())
                free = self._device_free() + idle
            else:
                free = self.cpu_budget_bytes - held_besides
            rest = offload.rest_for(self.offload_mode, nbytes, free, gpu=self.is_gpu)
            if rest is None:
                return None
            text = offload.note(rest, nbytes, free, forced=self.offload_mode == "on")
            return offload.Plan(onload=self.device, rest=rest, note=text, folder_root=self.offload_folder)

    def plan_for_load(self, nbytes: int, besides: int = 0) -> Any:
        """:meth:`offload_plan` for a denoiser not built yet (a loader asks it with sizes from the
        file's header): held besides it are every entry now and ``besides``, the same load's other modules."""
        with self._lock:
            return self.offload_plan(nbytes, sum(e.nbytes for e in self._entries.values()) + besides)

    def widen_if_room(self, modules: dict[str, Any]) -> str:
        """At load, on a CPU host: a denoiser held whole whose linear weights were kept bf16/fp16 only for
        being narrower than the compute dtype (nodes.runtime.fp8.held_dtype) is upcast when that fits the
        RAM budget beside every module held, the same load's included: the per-call casts cost about
        40 % of a FLUX step, and only memory was saved. Returns a note for the loader's message ("" when
        nothing was widened). fp8 stays fp8; a GPU computes in the file's own bf16/fp16. Should it no
        longer fit whole at a later use, :meth:`_fit_denoiser` narrows it back before paging it."""
        from nodes.runtime import fp8
        from nodes.runtime.offload import offloaded

        unet = modules.get(DENOISER)
        if self.is_gpu or self.offload_mode == "on" or unet is None or offloaded(unet) is not None:
            return ""
        extra = fp8.widening_bytes(unet)
        with self._lock:
            held = sum(e.nbytes for e in self._entries.values()) + sum(held_bytes(m) for m in modules.values())
            if not extra or held + extra > self.cpu_budget_bytes:
                return ""
        from engine.budget import format_bytes

        kept = fp8.widen(unet)
        dtype = str(fp8.compute_dtype(unet)).replace("torch.", "")
        return f"{kept} weights upcast to {dtype}: {format_bytes(extra)} more fits the RAM budget"

    def _fit_denoiser(self, entry: _Entry, module: Any) -> bool:
        """Place the denoiser about to run by :meth:`offload_plan`, asked again at every use: block by
        block (nodes.runtime.offload) when it does not fit whole, and whole again when one placed block
        by block now fits (memory was freed: another model unloaded, the budget raised, idle modules
        that can leave the device). Returns whether it runs block by block.

        While another job runs it (``in_use`` above this one), its placement stays: switching would
        pull its weights or hooks from under that job (and write its in-place LoRA patches to disk)."""
        from nodes.runtime import offload

        info = offload.offloaded(module)
        if entry.in_use.get(DENOISER, 0) > 1:
            return info is not None
        plan = self._denoiser_plan(module)
        if plan is not None and info is None and not self.is_gpu:  # widened at load, now short: narrow first
            from nodes.runtime import fp8

            freed = fp8.narrow(module)
            if freed:
                entry.nbytes -= freed
                self.counters["narrowed"] += 1
                plan = self._denoiser_plan(module)
        if (plan is None) == (info is None):
            return info is not None
        nbytes = module_bytes(module)
        if plan is not None:
            offload.offload_blocks(module, plan.onload, plan.rest, plan.note, plan.folder_root)
            if plan.rest == "disk":
                entry.nbytes -= nbytes  # no longer held in RAM
            self.counters["block_offloads"] += 1
            return True
        offload.make_whole(module)
        if info.paged:
            entry.nbytes += nbytes  # held in RAM again
        self.counters["made_whole"] += 1
        return False

    def _denoiser_plan(self, module: Any) -> Any:
        """:meth:`offload_plan` for a denoiser already held (None when it is whole on the device: nothing
        to decide): its own bytes (a paged module's placeholders have its full shapes and dtypes), every
        other module held besides it."""
        from nodes.runtime.offload import offloaded

        if offloaded(module) is None and self.is_gpu and module_device(module) != "cpu":
            return None
        return self.offload_plan(module_bytes(module),
                                 sum(e.nbytes for e in self._entries.values()) - held_bytes(module))

    # -- compiled mode -------------------------------------------------------------------

    def compiles(self) -> bool:
        """Whether this manager compiles its denoisers and VAE decoders (nodes.runtime.compiled's rule)."""
        from nodes.runtime.compiled import should_compile

        return should_compile(self.compile_mode, self.device)

    def compile_pending(self, key: tuple, name: str) -> str | None:
        """A note for the user when the next use of module ``name`` compiles it (None otherwise):
        what is compiled and the expected wait, said once per module by the node that uses it."""
        if not self.compiles():
            return None
        from nodes.runtime.compiled import EXPECTED_WAIT, TARGETS, is_compiled
        from nodes.runtime.offload import offloaded

        with self._lock:
            entry = self._entries.get(key)
            module = entry.modules.get(name) if entry is not None else None
            in_blocks = module is not None and (
                offloaded(module) is not None if name != DENOISER or entry.in_use.get(name)
                else self._denoiser_plan(module) is not None)  # how the next use will place it
        if name not in TARGETS or (module is not None and (is_compiled(module, name) or in_blocks)):
            return None  # an offloaded denoiser runs eagerly, block by block
        what = {"unet": "the denoiser", "vae": "the VAE decoder"}.get(name, name)
        wait = EXPECTED_WAIT["cuda" if self.device.startswith("cuda") else "cpu"]
        return (f"compiling {what} for {self.device} (--compile {self.compile_mode}): this first job waits "
                f"{wait}; later jobs reuse it, and restarts reuse the compiled code kept on disk")

    # -- memory pressure -------------------------------------------------------------

    def _device_resident(self) -> list[tuple[float, _Entry, str]]:
        out = []
        for entry in self._entries.values():
            for name, module in entry.modules.items():
                if name not in entry.in_use and module_device(module) != "cpu":
                    out.append((entry.module_last_used.get(name, entry.last_used), entry, name))
        return sorted(out, key=lambda t: t[0])

    def _device_free(self) -> int:
        import torch

        if self.device_budget_bytes is not None:
            used = sum(module_bytes(m) for e in self._entries.values() for m in e.modules.values()
                       if module_device(m) != "cpu")
            return self.device_budget_bytes - used
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            return free - self.device_reserve_bytes
        return 1 << 62  # MPS shares system memory; it reports no free figure worth trusting

    def _make_room(self, needed: int) -> None:
        """Offload idle modules, least recently used first, until ``needed`` bytes fit."""
        for _, entry, name in self._device_resident():
            if self._device_free() >= needed:
                return
            entry.modules[name].to("cpu")
            self.counters["offloads"] += 1
            self._empty_device_cache()

    def _fit_cpu_budget(self, keep: tuple) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= self.cpu_budget_bytes:
                break
            if entry.key == keep or entry.in_use:
                continue
            total -= entry.nbytes
            self._drop(entry.key)

    def _drop(self, key: tuple) -> None:
        self._entries.pop(key, None)
        self.counters["unloads"] += 1

    def _empty_device_cache(self) -> None:
        import sys

        torch = sys.modules.get("torch")
        if torch is None:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            torch.mps.empty_cache()

    # -- on request --------------------------------------------------------------------

    def unload_all(self, collect: bool = True) -> int:
        """Forget every idle model (in-use ones stay); returns how many were dropped. ``collect``: run a
        full garbage collection so memory held in reference cycles is back at once (what /free
        promises) and let go of the tokenizers kept for the next load (nodes/checkpoint/tokenizer_memo.py).
        It walks every object the process holds, a third of a second with diffusers and transformers
        imported: a caller only letting go of small models (a test's teardown) skips it and leaves the
        cycles to Python's own collector."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if not e.in_use]
            for key in keys:
                self._drop(key)
        if collect:
            from nodes.checkpoint import tokenizer_memo

            tokenizer_memo.forget()
            gc.collect()
        self._empty_device_cache()
        return len(keys)

    def free(self) -> int:
        """Move every idle module back to the CPU; returns the bytes moved off the device."""
        moved = 0
        with self._lock:
            for _, entry, name in self._device_resident():
                module = entry.modules[name]
                moved += module_bytes(module)
                module.to("cpu")
                self.counters["offloads"] += 1
        self._empty_device_cache()
        return moved

    def stats(self) -> dict[str, Any]:
        """JSON-able view: device, entries with their modules' bytes and placement, counters."""
        with self._lock:
            entries = []
            for entry in self._entries.values():
                kind, path = entry.key[0], entry.key[1] if len(entry.key) > 1 else ""
                entries.append({
                    "kind": kind, "path": str(path), "bytes": entry.nbytes, "in_use": sorted(entry.in_use),
                    "modules": {name or "model": {"bytes": module_bytes(m), "device": module_device(m)}
                                for name, m in entry.modules.items()},
                })
            return {
                "device": self._device or self._requested_device or "auto",
                "loaded": len(entries),
                "bytes": sum(e["bytes"] for e in entries),
                "cpu_budget_bytes": self.cpu_budget_bytes,
                "compile": self.compile_mode,
                "entries": entries,
                **self.counters,
            }
