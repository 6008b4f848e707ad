"""A FLUX transformer built straight into its blocks at rest on disk: the whole weight set never in RAM.

When the model manager will page the denoiser to disk anyway (a CPU host whose RAM budget is
short, or ``--offload on``; nodes.runtime.offload), building it whole first would still need the
model's full size free for the length of the load (the released [dev]: 11.9 GB in fp8, 47.6 GB
once bf16 is widened to the CPU's fp32), and only the steady state would be lower. The manager
decides before anything is read (ModelManager.plan_for_load, from :func:`held_bytes`: the
header's shapes and dtypes give the bytes the model will hold), and this module then builds:

1. the module on the meta device (no memory), every linear layer a CastLinear as disk mode wants;
2. the parts outside the blocks (embedders, final layer: <1 % of the weights) read and assigned;
3. each double and single block in turn: its tensors read one by one (a LazyState reads with
   pread), converted from the BFL layout (nodes.checkpoint.flux_keys.plan/convert, so errors are
   found from the keys before anything is read), fp8 linear weights kept fp8, assigned, written
   to the block file diffusers' group offloading will read, and dropped
   (nodes.runtime.offload.rest_block_on_disk);
4. diffusers' hooks applied over the files already written (nodes.runtime.offload.offload_blocks).

The result is the module the manager would have made by loading whole and offloading, so the
same jobs give the same latents and LoRAs run beside the paged weights the same way (the
family-independent steps are nodes.checkpoint.paged.build_paged; SD UNets use them too). A
diffusers-layout transformer in one file takes the same path with no conversion (its keys are
the module's own names; the config comes from its shapes run through the BFL conversion on meta).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.tensors import LazyState, dtypes_of, shapes_of


def strip_prefix(state: Mapping, prefix: str) -> Mapping:
    """The keys under ``prefix`` without it (other keys dropped); a LazyState stays lazy."""
    keys = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
    if isinstance(state, LazyState):
        return state.renamed(keys)
    return {new: state[old] for new, old in keys.items()}


def is_bfl(state: Mapping) -> bool:
    """Whether ``state`` (prefix stripped) is in the original BFL layout, which loads block by block."""
    return "img_in.weight" in state and "double_blocks.0.img_attn.qkv.weight" in state


def is_diffusers(state: Mapping) -> bool:
    """Whether ``state`` (prefix stripped) is in diffusers' layout (the module's own names), which loads
    block by block with no conversion."""
    from nodes.families.flux import DIFFUSERS_MARKERS

    return all(k in state for k in DIFFUSERS_MARKERS)


def _fp8_target(fp8: str) -> Any:
    import torch

    return getattr(torch, fp8) if fp8 else None


def held_bytes(state: Mapping, dtype: Any, fp8: str = "") -> int:
    """Bytes the built transformer will hold, from the header alone, by the loader's own rule
    (nodes.runtime.fp8.held_bytes; every 2-D weight of a FLUX transformer is a linear layer's, and
    UNETLoader's weight_dtype makes them fp8 first); the conversion to diffusers' layout splits
    tensors but keeps every value. Equals the built module's parameter bytes."""
    from nodes.checkpoint.scaled_fp8 import header_sizes
    from nodes.runtime import fp8 as held

    shapes, dtypes, scales = header_sizes(shapes_of(state), dtypes_of(state))  # a scaled file's row scales
    return scales + held.held_bytes(shapes, dtypes, dtype,
                                    lambda key, shape: len(shape) == 2 and key.endswith(".weight"), _fp8_target(fp8))


def build_into_blocks(state: Mapping, what: str, dtype: Any, plan: Any, fp8: str = "") -> Any:
    """FluxTransformer2DModel from BFL- or diffusers-layout ``state`` (prefix stripped), paged to disk block by block
    as it is read (the module docstring); ``plan``: the manager's "disk" nodes.runtime.offload.Plan."""
    from diffusers import FluxTransformer2DModel

    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.load import CheckpointError, _empty
    from nodes.checkpoint.paged import build_paged
    from nodes.runtime.fp8 import keep_linears_as_stored

    import torch

    from nodes.checkpoint.paged import own_rows

    state, scales = scaled_fp8.take(state, what)  # the scales read (they are small), the rest left lazy
    shapes = shapes_of(state)
    try:
        if is_bfl(state):
            config = flux_keys.transformer_config(shapes)
            rows = flux_keys.plan(shapes)
            hidden = int(shapes["img_in.weight"][0])
            scales = scaled_fp8.follow(scales, shapes, flux_keys.bfl_to_diffusers)
        else:  # diffusers layout: the config from the same tensors in BFL layout, on meta (no memory)
            bfl = flux_keys.diffusers_to_bfl({k: torch.empty(v, device="meta") for k, v in shapes.items()})
            config = flux_keys.transformer_config({k: tuple(v.shape) for k, v in bfl.items()})
            rows = None
    except flux_keys.KeyMismatch as exc:
        raise CheckpointError(f"{what}: the FLUX transformer's keys do not fit the FLUX layout: {exc}") from None
    except KeyError as exc:
        raise CheckpointError(f"{what}: not a complete FLUX transformer ({exc} is missing)") from None
    model = _empty(FluxTransformer2DModel, config)
    scaled_fp8.attach(model, scales, what)  # on the meta module: each block is written with its scales
    target = _fp8_target(fp8)

    def prepare(key: str, t: Any) -> Any:  # UNETLoader's weight_dtype, as load_transformer_file casts
        if target is not None and t.ndim == 2 and key.endswith(".weight") and t.is_floating_point():
            return t.to(target)
        return t

    table = own_rows(shapes) if rows is None else \
        [(key, functools.partial(flux_keys.convert, diff=diff, how=how, hidden=hidden)) for key, diff, how in rows]
    return build_paged(model, table, state, shapes, functools.partial(keep_linears_as_stored, model, compute_dtype=dtype),
                       plan, f"{what}: the FLUX transformer", prepare)
