"""UNETLoader files of the flow-transformer families (SD3, Z-Image, FLUX.2, Chroma, Qwen-Image, Krea 2, Ideogram 4,
JoyImage, ...) built straight into disk blocks (nodes.checkpoint.paged.build_paged), as FLUX.1 files are
(nodes.checkpoint.flux_blocks).

Each family already has its whole-dict key conversion (file names -> the diffusers module's, e.g.
nodes.checkpoint.z_image_keys.original_to_diffusers, diffusers' own SD3 converter). Rather than a second
copy of those rules per tensor, :func:`traced_rows` runs the family's conversion once on stand-ins: each
file tensor replaced by a 1-D int64 tensor holding (its index, row) for each of its rows. Every
conversion these families use only renames, splits, swaps or stacks rows of one tensor (the property
nodes.checkpoint.scaled_fp8.follow relies on too), so what comes out says, for each module tensor,
which file tensor it is and which of its rows, in order: one paged.Row per file tensor, applied as
each is read. A conversion that mixes tensors raises (it cannot be paged per tensor), unless the
family's layout says its conversion stacks rows of several file tensors into one module tensor
(``FileLayout.stacks``: Ovis-Image's gated MLP input); each file tensor then gives its paged.Piece, joined
when the block's tensors have all been read.

:func:`file_straight` then asks the manager with the size the build will hold (the same dtype rule run
on meta tensors, so it equals the whole build's module bytes), and builds only when the plan rests the
blocks on disk. UNETLoader's fp8 weight_dtype (file keys, as flow_transformers.transformer_file casts
them), ComfyUI's scaled fp8 and int8 files (scales, with an int8 layer's rotation group, read first,
sent through the same rows, attached on the meta module), the ``model.diffusion_model.`` prefix and a
family's refusals and last touch (Z-Image's timestep embedder) are handled as the whole build handles them.
Outputs equal the whole build paged afterwards bit for bit (tests/test_offload_load_families.py).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable

from nodes.checkpoint.paged import Row

#: A family's whole-dict key conversion: file tensors -> the module's tensors.
Convert = Callable[[dict[str, Any]], dict[str, Any]]
PREFIX = "model.diffusion_model."
_ID = 1 << 32  # stand-in value = file tensor index * _ID + row


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """How one family's file (prefix stripped, scales taken) becomes its module.

    ``config``: the module's arguments from the file's shapes; ``convert``: the family's key conversion
    (None: the file already has the module's names); ``after``: what the whole build does to the built
    module last (Z-Image's timestep embedder), run here before each block is written
    (nodes.checkpoint.paged.build_paged's ``ready``); ``in_compute``: module names ``after`` holds in the
    compute dtype (counted so in the size asked); ``stacks``: ``convert`` stacks the rows of several file
    tensors into one module tensor (module docstring)."""

    model_cls: Any
    label: str
    config: Callable[[dict[str, tuple[int, ...]]], dict[str, Any]]
    convert: Convert | None = None
    after: Callable[[Any], Any] | None = None
    in_compute: tuple[str, ...] = ()
    stacks: bool = False


def meta_state(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Empty tensors of these shapes on the meta device (nothing allocated)."""
    import torch

    return {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}


def config_via(to_original: Convert, config: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """A config rule for the original layout used on a file in the module's own layout: its shapes sent
    to the original names on meta tensors first (as nodes.checkpoint.flux_blocks does for FLUX)."""
    return lambda shapes: config({k: tuple(v.shape) for k, v in to_original(meta_state(shapes)).items()})


def keyed_layout(model_cls: Any, label: str, keys: Any, diffusers: bool, **extra: Any) -> FileLayout:
    """The layout of a family whose key module (``keys``: nodes.checkpoint.z_image_keys, chroma_keys,
    flux2_keys) has ``transformer_config`` (original-layout shapes), ``original_to_diffusers`` and
    ``diffusers_to_original``; ``diffusers``: the file holds the module's own names. ``extra``: the
    FileLayout's other fields."""
    if diffusers:
        return FileLayout(model_cls, label, config_via(keys.diffusers_to_original, keys.transformer_config), **extra)
    return FileLayout(model_cls, label, keys.transformer_config, keys.original_to_diffusers, **extra)


def _rows_of(out: Any, stacks: bool = False) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """(file tensor index, row runs) of one converted stand-in: one pair, or with ``stacks`` one per stretch
    of rows from one file tensor, in order; a tensor made of several raises otherwise."""
    import torch

    values = out.reshape(-1)
    if values.numel() == 0:
        raise ValueError("a converted tensor with no rows")
    sources = values // _ID
    changes = (torch.nonzero(sources[1:] != sources[:-1]).flatten() + 1).tolist()
    if changes and not (stacks and out.ndim == 1):
        raise ValueError("a converted tensor stacks several file tensors (not convertible per tensor)")
    out_runs = []
    for lo, hi in zip([0] + changes, changes + [values.numel()]):
        rows = values[lo:hi] % _ID
        breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
        starts, ends = [0] + breaks, breaks + [rows.numel()]
        out_runs.append((int(sources[lo]), tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, ends))))
    return out_runs


def _take(t: Any, parts: list[tuple[Any, tuple[tuple[int, int], ...], tuple[int, ...] | None]],
          whole: int) -> dict[str, Any]:
    """The module tensors one file tensor ``t`` gives: each its row runs of ``t`` (the tensor itself when
    it is all of ``t`` in order, a view for one run), its rows regrouped to ``shape`` where the conversion
    reshapes them (Krea 2's flat modulation tables: six rows of the width)."""
    import torch

    out = {}
    for name, runs, shape in parts:
        if t.ndim == 0 or runs == ((0, whole),):
            out[name] = t
        elif len(runs) == 1:
            out[name] = t[runs[0][0]:runs[0][1]]
        else:
            out[name] = torch.cat([t[a:b] for a, b in runs], dim=0)
        if shape is not None:
            out[name] = out[name].reshape(*shape, *t.shape[1:])
    return out


def traced_rows(convert: Convert, shapes: Mapping[str, tuple[int, ...]], stacks: bool = False) -> list[Row]:
    """paged.Rows equal to ``convert`` on a state of these ``shapes`` (module docstring); file tensors it
    drops get no row. Raises what ``convert`` raises for keys that do not fit, ValueError for a
    conversion that is not per tensor (``stacks``: one that stacks the rows of several file tensors is,
    each giving its paged.Piece)."""
    import torch

    from nodes.checkpoint.paged import Piece

    keys = list(shapes)
    stand_in = {k: (torch.tensor(i * _ID) if not shapes[k] else torch.arange(shapes[k][0]) + i * _ID)
                for i, k in enumerate(keys)}
    parts: dict[str, list[tuple[Any, tuple[tuple[int, int], ...], tuple[int, ...] | None]]] = {}
    for name, out in convert(dict(stand_in)).items():
        segments = _rows_of(out, stacks)
        for j, (index, runs) in enumerate(segments):
            if out.ndim == 0 and shapes[keys[index]]:
                raise ValueError(f"{name} is one value of {keys[index]}")
            piece = name if len(segments) == 1 else Piece(name, j, len(segments))
            parts.setdefault(keys[index], []).append((piece, runs, tuple(out.shape) if out.ndim > 1 else None))
    return [(key, functools.partial(_take, parts=parts[key], whole=shapes[key][0] if shapes[key] else 1))
            for key in keys if key in parts]


def strip(state: Mapping) -> Mapping:
    """``state`` without ``model.diffusion_model.`` when its keys carry it; a LazyState stays lazy."""
    from nodes.checkpoint.flux_blocks import strip_prefix

    return strip_prefix(state, PREFIX) if any(k.startswith(PREFIX) for k in state) else state


def _fp8_prepare(target: Any) -> Callable[[str, Any], Any] | None:
    """UNETLoader's weight_dtype on a file tensor as read: 2-D float ``.weight`` tensors in ``target``."""
    if target is None:
        return None

    def prepare(key: str, t: Any) -> Any:
        if t.ndim == 2 and key.endswith(".weight") and t.is_floating_point():
            return t.to(target)
        return t

    return prepare


def _scales_a_linear(model: Any, key: str) -> bool:
    """Whether the weight scale for ``key`` (a module weight name) belongs to a linear layer of ``model``
    (one the model lacks counts as one: scaled_fp8.attach names it)."""
    import torch

    try:
        return isinstance(model.get_submodule(key[: -len(".weight")]), torch.nn.Linear)
    except AttributeError:
        return True


def file_straight(state: Mapping, what: str, dtype: Any, fp8: str, offload: Any, layout: FileLayout,
                  besides: int = 0) -> Any | None:
    """The family's module built straight into disk blocks from a UNETLoader file when the manager
    (``offload``, nodes.checkpoint.flux_load.OffloadAsk), asked with the bytes it will hold, pages it to
    disk; None otherwise (the caller builds it whole), and None for a scaled file that scales a layer other
    than a linear one (ComfyUI quantises linears only; the whole build dequantises such a weight once, a
    block build would make its layer a CastLinear). ``state``: the file, prefix and all; ``fp8``:
    UNETLoader's weight_dtype (a torch dtype name, unused for a scaled file, as the whole build)."""
    import torch

    from nodes.checkpoint import kept_fp32, scaled_fp8
    from nodes.checkpoint.load import CheckpointError, _empty
    from nodes.checkpoint.paged import build_paged, joined, own_rows
    from nodes.checkpoint.tensors import dtypes_of, shapes_of
    from nodes.runtime.fp8 import keep_linears_as_stored

    if offload is None:
        return None
    target = getattr(torch, fp8) if fp8 and not scaled_fp8.is_scaled(state.keys()) else None  # as the whole build
    state, scales = scaled_fp8.take(strip(state), what)  # only the scales are read
    shapes, dtypes = shapes_of(state), dtypes_of(state)
    try:
        config = layout.config(shapes)
        rows = own_rows(shapes) if layout.convert is None else traced_rows(layout.convert, shapes, layout.stacks)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{what}: the {layout.label} transformer's keys do not fit the {layout.label} "
                              f"layout ({exc})") from None
    model = _empty(layout.model_cls, config)
    finish = functools.partial(keep_linears_as_stored, model, compute_dtype=dtype)
    prepare = _fp8_prepare(target)
    converted = {}
    for key, convert in rows:  # the build's own rule on meta tensors: the bytes it will hold
        t = torch.empty(shapes[key], dtype=dtypes[key], device="meta")
        converted.update(convert(prepare(key, t) if prepare is not None else t))
    held = finish(joined(converted))
    widened = (lambda k, v: k.startswith(layout.in_compute)  # ``after`` holds these in the compute dtype
               and (v.is_floating_point() or v.dtype == torch.int8))
    size = sum(v.numel() * (dtype.itemsize if widened(k, v) else v.element_size()) for k, v in held.items())
    size += kept_fp32.widened_bytes(model, {k: (tuple(v.shape), v.dtype) for k, v in held.items()
                                            if not widened(k, v)})  # ``after`` holds these in float32
    size += sum(b.numel() * b.element_size() for k, b in model.named_buffers() if k not in held)  # not in files
    module_scales = {}
    for key, convert in rows:  # a scale's rows go where its weight's rows go
        if key in scales:
            module_scales.update(convert(scales[key]))
    try:
        module_scales = joined(module_scales)
    except ValueError:  # a stacked weight scaled in part: the whole build's rule (scaled_fp8.follow) decides
        return None
    if not all(_scales_a_linear(model, k) for k in module_scales):
        return None  # e.g. a scaled embedding: the whole build dequantises it once (scaled_fp8.attach)
    size += sum(4 * v.shape[0] for k, v in module_scales.items()  # held: one float32 a row (scaled_fp8.attach)
                if not k.startswith(layout.in_compute))
    plan = offload(size, besides)
    if plan is None or plan.rest != "disk":
        return None
    scaled_fp8.attach(model, module_scales, what)  # on the meta module: each block is written with its scales
    return build_paged(model, rows, state, shapes, finish, plan, f"{what}: the {layout.label} transformer", prepare,
                       layout.after)
