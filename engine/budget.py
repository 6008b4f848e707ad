"""The resource budget: what a job will allocate, estimated before anything runs.

A node that decides how big images or latents get declares it next to its inputs
(``define_node(..., size=Size(width="width", height="height", batch="batch_size"))``),
so the estimate reads the same input names the function receives and cannot drift
from the node. Validation walks the plan in order and carries each node's image
size (pixels and batch) along its links: a node without a declaration passes on
the size of what it receives (VAEEncode, the sampler and SaveImage keep the size),
a declared one sets or scales it. From the sizes and the outputs' socket types it
sums the bytes the job's tensors take and checks two limits:

* ``max_image_pixels``: the largest image (width x height) a node may make; the
  same limit that guards decoding a file, so one number says "the largest image
  this process handles";
* ``max_job_bytes``: the estimated memory of every image, mask and latent of the
  job (the executor keeps each node's outputs until the job ends, so they add up),
  by default half of this host's memory.

An error names the node, the input that sets the size and the limit (with the
option that raises it). The estimate is a floor, not a model of every kernel:
``work`` lets a node count its intermediates (a resize holds about three copies),
and ``transient`` what it needs only while it runs (a VAE's full-resolution
activations), which counts against the limit at that node but is not carried on.
A node whose size comes from a file (LoadImage) gives a ``probe`` that reads the
size without decoding the pixels, so a huge input is refused before it is loaded.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from engine import types as T

#: Bytes per element of the float32 tensors nodes pass around.
ELEMENT_BYTES = 4
#: Elements per pixel of each socket type; latents are 1/8 of the image per side.
_PER_PIXEL = {T.IMAGE: 3.0, T.MASK: 1.0, T.LATENT: 4.0 / 64.0}


@functools.lru_cache(maxsize=1)
def host_memory_bytes() -> int:
    """Memory this process may use: the physical memory, or the cgroup's limit if lower.

    Read once per process: every validation asks (twice per server job, at submission
    and again in the worker), and opening the cgroup files each time cost more than the
    rest of a cached job's budget check.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(limit_file).read().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return int(total)


def default_job_bytes() -> int:
    """Half of the host's memory: a job may take that much, so two cannot exhaust the machine."""
    return host_memory_bytes() // 2


DEFAULT_IMAGE_PIXELS = 8192 * 8192


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5GiB' or a plain number of bytes (the ``--max-job-memory`` option)."""
    raw = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    value = float(number)
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value * scale)


def parse_pixels(text: str) -> int:
    """'8192x8192' or a plain number of pixels (the ``--max-image-pixels`` option)."""
    raw = str(text).strip().lower()
    if "x" in raw:
        w, _, h = raw.partition("x")
        value = int(w) * int(h)
    else:
        value = int(raw)
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive number of pixels")
    return value


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


@dataclass(frozen=True)
class Size:
    """How a node sets the size of the images or latents it outputs.

    Each field names one of the node's inputs (or gives a constant). ``width`` and
    ``height`` are in pixels; 0 (or a missing value) means "follow the other side's
    aspect ratio, or the incoming size"; ``like`` names the linked input whose size
    that is. ``scale`` multiplies the incoming size (an upscale factor), ``batch``
    sets the batch (else it is the incoming one), ``repeat`` multiplies it,
    ``pad`` names the (left, top, right, bottom) inputs added to the incoming size,
    ``megapixels`` sets the area in units of 1024x1024 at the incoming aspect
    ratio, ``work`` counts the node's intermediate copies in the job's memory
    estimate and ``transient`` the elements per output pixel it holds only while
    running. ``probe(env, literals)`` returns (width, height, batch) when the size
    is in a file the literals name, or None when it cannot be known yet.
    """

    width: str | int | None = None
    height: str | int | None = None
    batch: str | int | None = None
    scale: str | float | None = None
    like: str | None = None
    repeat: str | None = None
    pad: tuple[str, str, str, str] | None = None
    megapixels: str | None = None
    work: float = 1.0
    transient: float = 0.0
    probe: Callable[[Any, Mapping[str, Any]], tuple[int, int, int] | None] | None = None
    #: the input naming the file ``probe`` reads (what an error about its size names)
    reads: str | None = None

    def input_names(self) -> list[str]:
        """Every input this declaration reads (the node checks that each exists)."""
        named = [self.width, self.height, self.batch, self.scale, self.like, self.repeat, self.megapixels,
                 self.reads, *(self.pad or ())]
        return [n for n in named if isinstance(n, str)]


@dataclass(frozen=True)
class Extent:
    """An image size carried along links: pixels per side and the batch."""

    width: int
    height: int
    batch: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class Budget:
    max_image_pixels: int = DEFAULT_IMAGE_PIXELS
    max_job_bytes: int = 0  # 0: half of this host's memory, computed when first needed

    def job_bytes(self) -> int:
        return self.max_job_bytes or default_job_bytes()


@dataclass
class Overrun:
    """One limit a node would break: where, which input sets it, and the message."""

    node_id: str
    input_name: str | None
    message: str
    limit: int


def _value(decl: str | int | float | None, literals: Mapping[str, Any]) -> Any:
    if isinstance(decl, str):
        return literals.get(decl)
    return decl


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def extent_of(size: Size, literals: Mapping[str, Any], incoming: Mapping[str, Extent],
              env: Any = None) -> Extent | None:
    """The output size a declaration gives, or None when it cannot be known before running."""
    if size.probe is not None:
        found = size.probe(env, literals) if env is not None else None
        return Extent(*found) if found else None
    base = incoming.get(size.like) if size.like else next(iter(incoming.values()), None)
    extent = _extent(size, literals, base)
    if extent is None:
        return None
    repeat = _number(literals.get(size.repeat)) if size.repeat else None
    if size.pad:
        left, top, right, bottom = (_number(literals.get(name)) or 0 for name in size.pad)
        extent = Extent(extent.width + int(left + right), extent.height + int(top + bottom), extent.batch)
    if repeat:
        extent = Extent(extent.width, extent.height, extent.batch * max(1, int(repeat)))
    return extent


def _extent(size: Size, literals: Mapping[str, Any], base: Extent | None) -> Extent | None:
    width, height = _number(_value(size.width, literals)), _number(_value(size.height, literals))
    scale = _number(_value(size.scale, literals))
    batch = _number(_value(size.batch, literals))
    megapixels = _number(literals.get(size.megapixels)) if size.megapixels else None
    if megapixels is not None and base is not None:
        scale = (megapixels * 1024 * 1024 / max(1, base.pixels)) ** 0.5
    if scale is not None:
        if base is None:
            return None
        width, height = base.width * scale, base.height * scale
    if not width and not height:
        if base is None:
            return None
        width, height = base.width, base.height
    elif not width or not height:
        if base is None or not base.width or not base.height:
            return None
        width = width or height * base.width / base.height
        height = height or width * base.height / base.width
    return Extent(max(1, round(width)), max(1, round(height)),
                  max(1, int(batch)) if batch else (base.batch if base else 1))


def _size_input(size: Size, prefer_batch: bool, literals: Mapping[str, Any]) -> str | None:
    """The input to name in an error: the batch when batches made it big, else what set the size."""
    if size.pad and not prefer_batch:
        return max(size.pad, key=lambda name: _number(literals.get(name)) or 0)
    batch = (size.batch, size.repeat) if prefer_batch else ()
    for decl in batch + (size.reads, size.scale, size.megapixels, size.width, size.height, *(size.pad or ()), size.batch,
                         size.repeat):
        if isinstance(decl, str):
            return decl
    return None


def check(plan_nodes: Mapping[str, Any], order: list[str], budget: Budget, env: Any = None) -> list[Overrun]:
    """Every limit the plan's nodes would break, in plan order.

    ``plan_nodes`` maps node ids to planned nodes (``spec``, ``literals``, ``links``);
    ``env`` is handed to probes (without it, sizes in files count as unknown).
    """
    extents: dict[str, Extent] = {}
    overruns: list[Overrun] = []
    total = 0.0
    job_limit = budget.job_bytes()
    over_job = False
    for node_id in order:
        node = plan_nodes[node_id]
        spec = node.spec
        incoming = {name: extents[link.node_id] for name, link in node.links.items() if link.node_id in extents}
        size: Size | None = getattr(spec, "size", None)
        extent = extent_of(size, node.literals, incoming, env) if size else next(iter(incoming.values()), None)
        if extent is None:
            continue
        extents[node_id] = extent
        if size is not None and (size.input_names() or size.probe) and extent.pixels > budget.max_image_pixels:
            overruns.append(Overrun(
                node_id, _size_input(size, False, node.literals),
                f"{extent.width}x{extent.height} = {extent.pixels} pixels is over the limit of "
                f"{budget.max_image_pixels} pixels per image (raise it with --max-image-pixels)",
                budget.max_image_pixels))
            continue
        per_pixel = sum(_PER_PIXEL.get(o.type, 0.0) for o in spec.outputs)
        elements = extent.pixels * extent.batch
        total += per_pixel * elements * ELEMENT_BYTES * (size.work if size else 1.0)
        running = total + (size.transient * elements * ELEMENT_BYTES if size else 0.0)
        if running > job_limit and not over_job:
            over_job = True
            what = f"{extent.width}x{extent.height} pixels" + (f" x {extent.batch} images" if extent.batch > 1 else "")
            held = (f"the job would need about {format_bytes(running)} while this node runs"
                    if running > total else f"the job would hold about {format_bytes(total)} of images and latents "
                                            f"by this node")
            overruns.append(Overrun(
                node_id, _size_input(size, extent.batch > 1, node.literals) if size else None,
                f"{held} ({what} here), over the budget of {format_bytes(job_limit)} per job "
                f"(raise it with --max-job-memory{', or use a tiled node' if running > total else ''})",
                job_limit))
    return overruns
