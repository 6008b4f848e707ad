"""Building a denoiser straight into its blocks at rest on disk, whatever its family.

The model manager decides before anything is read whether a denoiser will be paged to disk
(ModelManager.plan_for_load, with the size the file's header gives). When it will, building it
whole first would need its full size free in RAM for the length of the load, and only the
steady state would be lower. :func:`build_paged` instead:

1. takes the module built on the meta device and a conversion table (each file tensor -> the
   module tensors it becomes), checks every key and every converted shape from the header
   (a bad file fails before anything is written);
2. makes every linear layer a CastLinear and a private block folder (nodes.runtime.offload.prepare_paged);
3. reads and assigns the parts outside the blocks, then each block in turn: its tensors read one
   by one (a LazyState reads with pread), converted, assigned, written to the block file
   diffusers' group offloading reads, and dropped (nodes.runtime.offload.rest_block_on_disk);
4. applies diffusers' hooks over the files already written (nodes.runtime.offload.offload_blocks).

The result is the module the manager would have made by loading whole and offloading, so jobs
give the same latents and LoRAs run beside the paged weights the same way. The families' tables:
nodes.checkpoint.flux_blocks (FLUX, BFL or diffusers layout), :func:`unet_rows` (SD UNets, original
layout) and nodes.checkpoint.paged_files (the UNETLoader files of SD3, Z-Image, FLUX.2, Chroma and
Qwen-Image, their own key conversions traced into rows); a file in the module's own (diffusers) layout
needs no conversion: :func:`own_rows`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

#: (file key, conversion): the module tensors one file tensor becomes, by their module names (or
#: :class:`Piece` of one, where a module tensor stacks the rows of several file tensors).
Row = tuple[str, Callable[[Any], dict[Any, Any]]]


class Piece(NamedTuple):
    """The ``index``-th of ``count`` row pieces of the module tensor ``name``, one file tensor's part of a
    tensor stacked from several (Ovis-Image's gated MLP input: ComfyUI's up and gate projections). All
    pieces of a tensor belong to one block, so :func:`joined` meets them together in one part's read."""

    name: str
    index: int
    count: int


def joined(tensors: dict[Any, Any]) -> dict[str, Any]:
    """``tensors`` with the :class:`Piece` of each module tensor stacked by rows, in order (meta tensors
    too). Raises ValueError when a tensor's pieces are not all there."""
    import torch

    out = {k: v for k, v in tensors.items() if not isinstance(k, Piece)}
    pieces: dict[str, dict[int, Any]] = {}
    counts: dict[str, int] = {}
    for k, v in tensors.items():
        if isinstance(k, Piece):
            pieces.setdefault(k.name, {})[k.index] = v
            counts[k.name] = k.count
    for name, got in pieces.items():
        if sorted(got) != list(range(counts[name])):
            raise ValueError(f"{name}: {len(got)} of its {counts[name]} stacked pieces")
        out[name] = torch.cat([got[i] for i in range(counts[name])], dim=0)
    return out


def build_paged(model: Any, rows: list[Row], state: Mapping, shapes: dict[str, tuple[int, ...]],
                finish: Callable[[dict[str, Any]], dict[str, Any]], plan: Any, what: str,
                prepare: Callable[[str, Any], Any] | None = None,
                ready: Callable[[Any], Any] | None = None) -> Any:
    """Fill the meta-device ``model`` from ``state`` block by block, each block paged to disk as soon as
    it is read (module docstring). ``finish``: the dtype rule over one part's converted tensors;
    ``prepare``: applied to each file tensor as read; ``plan``: the manager's "disk" Plan; ``ready``: the
    family's last touch to the built module (Z-Image's timestep embedder in the compute dtype), run on the
    module after each part is assigned and before that part is written (its layers still on the meta
    device are to be skipped, those already done left alone), so the block files hold its result."""
    import torch

    from nodes.checkpoint.load import CheckpointError
    from nodes.runtime import offload

    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted: dict[str, tuple[int, ...]] = {}
    stacked: dict[Piece, Any] = {}
    for key, convert in rows:  # from the header alone: meta tensors through the same conversion
        for k, v in convert(torch.empty(shapes[key], device="meta")).items():
            if isinstance(k, Piece):
                stacked[k] = v
                continue
            converted[k] = tuple(v.shape)
            if k in own and own[k] != converted[k]:
                raise CheckpointError(f"{what}: the weight {key} gives {k} the shape {converted[k]}, "
                                      f"expected {own[k]}")
    try:
        whole = joined(stacked)
    except ValueError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    for k, v in whole.items():
        converted[k] = tuple(v.shape)
        if k in own and own[k] != converted[k]:
            raise CheckpointError(f"{what}: the weights stacked into {k} give it the shape {converted[k]}, "
                                  f"expected {own[k]}")
    missing, unexpected = [k for k in own if k not in converted], sorted(k for k in converted if k not in own)
    if missing or unexpected:
        raise CheckpointError(f"{what}: the weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    folder = offload.prepare_paged(model, plan.folder_root)

    def read(part: list[Row]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, convert in part:
            t = state[key]
            out.update(convert(prepare(key, t) if prepare is not None else t))
        return finish(joined(out))

    layout = offload.blocks(model)
    owners = {f"{name}.{i}.": (name, i) for name, i, _ in layout}
    parts: dict[Any, list[Row]] = {}
    for row in rows:
        key = next(iter(row[1](torch.empty(shapes[row[0]], device="meta"))))
        key = key.name if isinstance(key, Piece) else key
        owner = next((owners[p] for p in _prefixes(key) if p in owners), None)
        parts.setdefault(owner, []).append(row)
    model.requires_grad_(False)  # before assigning: an int8 weight cannot be a parameter that wants gradients
    model.load_state_dict(read(parts.pop(None, [])), strict=False, assign=True)  # outside the blocks
    if ready is not None:
        ready(model)
    for name, i, block in layout:
        prefix = f"{name}.{i}."
        sub = {k[len(prefix):]: v for k, v in read(parts.pop((name, i), [])).items()}
        block.load_state_dict(sub, strict=True, assign=True)
        del sub
        if ready is not None:
            ready(model)
        offload.rest_block_on_disk(block, name, i, plan.onload, folder)
    model.eval()
    offload.offload_blocks(model, plan.onload, "disk", plan.note, folder=folder)
    return model


def _prefixes(key: str) -> list[str]:
    """"a.b.c.d" -> ["a.b.", "a.b.c."]: the block prefixes a tensor name can have (a top-level list's
    "list.i." or a nested child's "child.list.i.")."""
    parts = key.split(".")
    return [".".join(parts[:n]) + "." for n in (2, 3) if len(parts) > n]


def own_rows(keys: Any) -> list[Row]:
    """The table of a file already in the module's own layout (a diffusers-layout file): each key is
    its own module tensor. build_paged still checks every key and shape against the module."""
    return [(k, lambda t, k=k: {k: t}) for k in keys]


def float_bytes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any], dtype: Any) -> int:
    """Bytes of tensors held with every float in ``dtype`` (the rest as stored)."""
    return sum(math.prod(shape) * (dtype.itemsize if dtypes[key].is_floating_point else dtypes[key].itemsize)
               for key, shape in shapes.items())


def unet_rows(model: Any, keys: Any) -> list[Row] | None:
    """An SD UNet's table: original-layout file keys (``model.diffusion_model.*``) -> diffusers names, a
    pure renaming (nodes.checkpoint.to_original's map, run on the module's own names). None when the
    map does not cover the module or the file (the caller then builds whole)."""
    from nodes.checkpoint.to_original import unet_to_original

    try:
        names = unet_to_original({k: k for k in model.state_dict()}, dict(model.config))
    except KeyError:
        return None
    keys = set(keys)
    if set(names) != keys:
        return None
    return [(orig, lambda t, d=diff: {d: t}) for orig, diff in names.items()]


def build_unet_paged(model: Any, state: Mapping, dtype: Any, plan: Any, what: str) -> Any | None:
    """An SD UNet (meta ``model``, its config from the file) built straight into disk blocks; None when
    :func:`unet_rows` has no table for it. Floats are cast to ``dtype``, as the whole load does."""
    from nodes.checkpoint.tensors import shapes_of

    keys = [k for k in state if k.startswith("model.diffusion_model.")]
    rows = unet_rows(model, keys)
    if rows is None:
        return None

    return build_paged(model, rows, state, shapes_of(state), functools.partial(_cast_floats, dtype=dtype), plan, what)


def _cast_floats(part: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Floats in the compute ``dtype``, as a whole load casts them."""
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in part.items()}


def own_layout_straight(model: Any, state: Mapping, dtype: Any, offload: Any, what: str,
                        besides: int = 0, as_stored: bool = False,
                        ready: Callable[[Any], Any] | None = None) -> Any | None:
    """A denoiser from a file in its own (diffusers) layout, e.g. a diffusers folder's ``unet/``, built
    straight into disk blocks when the manager (``offload``, asked with the header's size) will page it
    to disk; None otherwise (the caller builds it whole). Floats are cast to ``dtype``; ``as_stored``:
    linear weights held as stored (nodes.runtime.fp8.keep_linears_as_stored), the size asked by the
    same rule; ``ready``: as for :func:`build_paged`."""
    from nodes.checkpoint.kept_fp32 import widened_bytes
    from nodes.checkpoint.tensors import dtypes_of, shapes_of
    from nodes.runtime import fp8

    if offload is None:
        return None
    shapes, dtypes = shapes_of(state), dtypes_of(state)
    size = fp8.held_bytes(shapes, dtypes, dtype, fp8.linear_weights_of(model)) if as_stored else \
        float_bytes(shapes, dtypes, dtype)
    # a class's kept float32 modules: its loaders hold them so (``ready``: nodes.checkpoint.kept_fp32)
    size += widened_bytes(model, {k: (shapes[k], dtype) for k in shapes if dtypes[k].is_floating_point})
    plan = offload(size, besides)
    if plan is None or plan.rest != "disk":
        return None
    finish = functools.partial(fp8.keep_linears_as_stored, model, compute_dtype=dtype) if as_stored else \
        functools.partial(_cast_floats, dtype=dtype)
    return build_paged(model, own_rows(shapes), state, shapes, finish, plan, what, ready=ready)


def unet_straight(model: Any, state: Mapping, dtype: Any, offload: Any, what: str, besides: int = 0) -> Any | None:
    """The SD UNet built straight into disk blocks when the manager (``offload``: the loader's question,
    nodes.checkpoint.flux_load.OffloadAsk), asked with its size from the header, will page it to disk;
    None otherwise (the caller builds it whole)."""
    from nodes.checkpoint.tensors import dtypes_of, shapes_of

    if offload is None:
        return None
    keys = [k for k in state if k.startswith("model.diffusion_model.")]
    shapes, dtypes = shapes_of(state), dtypes_of(state)
    plan = offload(float_bytes({k: shapes[k] for k in keys}, dtypes, dtype), besides)
    if plan is None or plan.rest != "disk":
        return None
    return build_unet_paged(model, state, dtype, plan, what)
