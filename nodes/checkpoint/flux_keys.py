"""FLUX transformer weights: the original (BFL) key layout <-> diffusers' FluxTransformer2DModel.

One table, used both ways: loading a ``flux1-*.safetensors`` (BFL -> diffusers)
and writing one (diffusers -> BFL, for tests and exports). diffusers ships a
converter for the first direction (``convert_flux_transformer_checkpoint_to_
diffusers``) but it assumes the released width (3072) when it splits the single
blocks' fused projection, so it cannot load a FLUX-shaped model of another width;
this table takes the widths from the tensors and is checked against diffusers'
converter key for key (tests/test_flux_loading.py).

Fused tensors: a double block's ``qkv`` is q, k, v stacked; a single block's
``linear1`` is q, k, v and the MLP input stacked; the final norm's modulation is
(shift, scale) in BFL and (scale, shift) in diffusers.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Callable

#: (BFL name, diffusers name) of plain renames, "{i}" the block index; weight and bias both.
_TOP = [
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
]
_DOUBLE = [
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
]
_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"), ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [("modulation.lin", "norm.linear"), ("linear2", "proj_out")]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def count_matches(keys: Any, pattern: str) -> int:
    """How many distinct values the one group of ``pattern`` takes over the keys it matches (from their
    start): a layer or block count read from a checkpoint's names, e.g. ``r"double_blocks\.(\d+)\."``."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys for m in [rx.match(k)] if m})


def _blocks(keys: Any, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def _swap_halves(t: Any) -> Any:
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pairs(bfl_keys: Any, diff_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """(BFL names, diffusers names, how) for every tensor; ``how`` is rename, fuse or swap."""
    double = _blocks(bfl_keys, "double_blocks.") or _blocks(diff_keys, "transformer_blocks.")
    single = _blocks(bfl_keys, "single_blocks.") or _blocks(diff_keys, "single_transformer_blocks.")
    out: list[tuple[list[str], list[str], str]] = []
    for suffix in ("weight", "bias"):
        out += [([f"{b}.{suffix}"], [f"{d}.{suffix}"], "rename") for b, d in _TOP]
        out.append(([f"{_FINAL_MOD[0]}.{suffix}"], [f"{_FINAL_MOD[1]}.{suffix}"], "swap"))
        for i in double:
            b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            out += [([f"{b}{x}.{suffix}"], [f"{d}{y}.{suffix}"], "rename") for x, y in _DOUBLE]
            out.append(([f"{b}img_attn.qkv.{suffix}"], [f"{d}attn.to_{q}.{suffix}" for q in "qkv"], "fuse"))
            out.append(([f"{b}txt_attn.qkv.{suffix}"], [f"{d}attn.add_{q}_proj.{suffix}" for q in "qkv"], "fuse"))
        for i in single:
            b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            out += [([f"{b}{x}.{suffix}"], [f"{d}{y}.{suffix}"], "rename") for x, y in _SINGLE]
            out.append(([f"{b}linear1.{suffix}"],
                        [f"{d}attn.to_q.{suffix}", f"{d}attn.to_k.{suffix}", f"{d}attn.to_v.{suffix}",
                         f"{d}proj_mlp.{suffix}"], "fuse"))
    for i in double:
        out += [([f"double_blocks.{i}.{x}"], [f"transformer_blocks.{i}.{y}"], "rename") for x, y in _DOUBLE_NORMS]
    for i in single:
        out += [([f"single_blocks.{i}.{x}"], [f"single_transformer_blocks.{i}.{y}"], "rename")
                for x, y in _SINGLE_NORMS]
    return out


#: A key table: (original keys, diffusers keys) -> (original names, diffusers names, how) rows (:func:`_pairs`).
Pairs = Callable[[Any, Any], list[tuple[list[str], list[str], str]]]


class KeyMismatch(KeyError):
    """Keys a FLUX file lacks or has beyond the layout; the message names them."""


#: The prefix ComfyUI's checkpoints put before a transformer's original-layout keys.
UNET_PREFIX = "model.diffusion_model."


def strip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with :data:`UNET_PREFIX` taken off the keys that carry it."""
    return {k[len(UNET_PREFIX):] if k.startswith(UNET_PREFIX) else k: v for k, v in state.items()}


def has_keys(keys: Any, *markers: str) -> bool:
    """Whether every marker is among ``keys``, bare (a lone transformer file) or under :data:`UNET_PREFIX`
    (a ComfyUI checkpoint): the detection test of the transformer key modules."""
    keys = keys if isinstance(keys, (AbstractSet, Mapping)) else set(keys)
    return all(m in keys or UNET_PREFIX + m in keys for m in markers)


def plan_from(pairs: Pairs, keys: Any, optional: tuple[str, ...] = ()) -> list[tuple[str, list[str], str]]:
    """(original name, diffusers names, how) for every tensor of an original-layout key set, by a key
    table of :func:`_pairs`' shape (FLUX's, Chroma's, FLUX.2's): one walker, so every table checks a
    file alike. Keys starting with one of ``optional`` may be absent. Raises :class:`KeyMismatch`
    naming missing and left-over keys."""
    keys = set(keys)
    out: list[tuple[str, list[str], str]] = []
    missing: list[str] = []
    for original, diff, how in pairs(keys, ()):
        if original[0] in keys:
            out.append((original[0], diff, how))
        elif not original[0].startswith(optional):
            missing.append(original[0])
    extra = sorted(keys - {key for key, _, _ in out})
    if missing or extra:
        raise KeyMismatch(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                          f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    return out


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(BFL name, diffusers names, how) for every tensor of a BFL-layout key set, from the keys alone.

    No tensor is read, so a loader can check a file and then read it piece by piece (a block at a
    time, nodes.checkpoint.flux_blocks). Raises :class:`KeyMismatch` naming missing and left-over keys
    ([schnell] has no guidance embedder, so ``guidance_in.`` may be absent).
    """
    return plan_from(_pairs, keys, ("guidance_in.",))


def convert(t: Any, diff: list[str], how: str, hidden: int) -> dict[str, Any]:
    """The diffusers tensors of one BFL tensor ``t`` (one row of :func:`plan`); ``hidden`` splits fused ones."""
    import torch

    if how == "rename":
        return {diff[0]: t}
    if how == "swap":
        return {diff[0]: _swap_halves(t)}
    sizes = [hidden] * 3 + ([t.shape[0] - 3 * hidden] if len(diff) == 4 else [])
    return dict(zip(diff, torch.split(t, sizes, dim=0)))


def to_diffusers(state: dict[str, Any], plan: Callable[[Any], list[tuple[str, list[str], str]]],
                 hidden: int | None = None) -> dict[str, Any]:
    """diffusers-layout tensors from original-layout ones (:data:`UNET_PREFIX` stripped first) by a
    table's ``plan``; the walker every FLUX-shaped table converts with. ``hidden``: the transformer
    width (from ``img_in.weight``), which splits the fused tensors. Raises :class:`KeyMismatch`."""
    state = strip(state)
    rows = plan(state.keys())
    hidden = hidden or int(state["img_in.weight"].shape[0])
    out: dict[str, Any] = {}
    for key, diff, how in rows:
        out.update(convert(state[key], diff, how, hidden))
    return out


def to_original(state: dict[str, Any], pairs: Pairs) -> dict[str, Any]:
    """Original-layout tensors from a diffusers state dict by a table of :func:`_pairs`' shape (the
    inverse of :func:`to_diffusers`: renamed, halves swapped back, fused parts concatenated)."""
    import torch

    out: dict[str, Any] = {}
    for original, diff, how in pairs((), state.keys()):
        if diff[0] not in state:
            continue
        if how == "rename":
            out[original[0]] = state[diff[0]]
        elif how == "swap":
            out[original[0]] = _swap_halves(state[diff[0]])
        else:
            out[original[0]] = torch.cat([state[d] for d in diff], dim=0)
    return out


def bfl_to_diffusers(state: dict[str, Any], hidden: int | None = None) -> dict[str, Any]:
    """diffusers-layout tensors from BFL-layout ones (:func:`to_diffusers` on FLUX's table)."""
    return to_diffusers(state, plan, hidden)


def diffusers_to_bfl(state: dict[str, Any]) -> dict[str, Any]:
    """BFL-layout tensors from a FluxTransformer2DModel state dict (the inverse of :func:`bfl_to_diffusers`)."""
    return to_original(state, _pairs)


def original_names(diffusers_names: Any, pairs: "Pairs | None" = None) -> dict[str, str]:
    """diffusers name -> the BFL name of the tensor it is (or is a part of, for fused ones).
    ``pairs``: another table of the same shape (Chroma's, nodes.checkpoint.chroma_keys)."""
    names = set(diffusers_names)
    return {d: bfl[0] for bfl, diff, _ in (pairs or _pairs)((), names) for d in diff if d in names}


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """FluxTransformer2DModel arguments from BFL-layout shapes (nothing fetched).

    The rotary axes are not in the weights: the released models split a 128-wide
    head as (16, 56, 56); other head widths keep those proportions (1/8, 7/16, 7/16).
    """
    s = strip(dict(shapes))
    hidden, in_channels = s["img_in.weight"]
    head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return dict(patch_size=1, in_channels=in_channels, out_channels=None,
                num_layers=len(_blocks(s, "double_blocks.")), num_single_layers=len(_blocks(s, "single_blocks.")),
                attention_head_dim=head, num_attention_heads=hidden // head,
                joint_attention_dim=s["txt_in.weight"][1], pooled_projection_dim=s["vector_in.in_layer.weight"][1],
                guidance_embeds="guidance_in.in_layer.weight" in s,
                axes_dims_rope=(head // 8, head * 7 // 16, head * 7 // 16))


Converter = Callable[[dict[str, Any]], dict[str, Any]]


#: rows of a fused/reordered original-layout weight that one diffusers weight takes, in order
Rows = tuple[tuple[int, int], ...]


def lora_modules(shapes: dict[str, tuple[int, ...]],
                 pairs: Pairs | None = None) -> dict[str, str | tuple[tuple[str, Rows], ...]]:
    """Original (BFL) module name -> the diffusers weights it covers, with their rows of it.

    For LoRAs written against the original layout (ComfyUI, kohya's FLUX trainer): a
    LoRA on a fused module (``img_attn.qkv``, ``linear1``) has one ``down`` factor
    and an ``up`` factor whose rows stack the parts, so each diffusers weight takes
    its rows of ``up`` with the whole ``down``; the final modulation's halves swap.
    A q/k norm's one parameter is ``scale`` in BFL (``weight`` in diffusers): a whole difference
    for it may name the parameter (``...query_norm.scale.diff``, ComfyUI's key for a parameter
    not called ``weight``) or the module (``...query_norm.diff``, LyCORIS), so both map to it.
    ``shapes``: the diffusers model's parameter shapes (row counts come from them); ``pairs``: another
    table of the same shape (Chroma's).
    """
    out: dict[str, str | tuple[tuple[str, Rows], ...]] = {}
    for bfl, diff, how in (pairs or _pairs)((), shapes.keys()):
        if bfl[0].endswith(".scale") and diff[0] in shapes:  # a q/k norm: a plain rename
            out[bfl[0]] = out[bfl[0][: -len(".scale")]] = diff[0]
            continue
        if not bfl[0].endswith(".weight") or any(d not in shapes or len(shapes[d]) != 2 for d in diff):
            continue
        if how == "swap":
            half = shapes[diff[0]][0] // 2
            parts: tuple[tuple[str, Rows], ...] = ((diff[0], ((half, 2 * half), (0, half))),)
        else:
            parts = stacked_rows(diff, shapes)
        out[bfl[0][: -len(".weight")]] = parts
    return {**out, **_xlabs_aliases(out)}


#: XLabs' LoRA processors (its FLUX trainer; ByteDance's USO and UNO LoRAs) -> the original module they
#: patch; "qkv" is the q, k, v rows of a single block's linear1 (no MLP rows: XLabs leaves the MLP alone)
_XLABS = {"double_blocks.{}.processor.qkv_lora1": "double_blocks.{}.img_attn.qkv",
          "double_blocks.{}.processor.qkv_lora2": "double_blocks.{}.txt_attn.qkv",
          "double_blocks.{}.processor.proj_lora1": "double_blocks.{}.img_attn.proj",
          "double_blocks.{}.processor.proj_lora2": "double_blocks.{}.txt_attn.proj",
          "single_blocks.{}.processor.qkv_lora": "single_blocks.{}.linear1:qkv",
          "single_blocks.{}.processor.proj_lora": "single_blocks.{}.linear2"}


def _xlabs_aliases(modules: dict[str, Any]) -> dict[str, Any]:
    """XLabs' processor names (and ComfyUI's ``single_blocks.N.linear1_qkv``, its name for the same q, k, v
    rows) for the original modules in ``modules``, so LoRAs in that layout find their weights."""
    out: dict[str, Any] = {}
    for block in range(max((int(k.split(".")[1]) for k in modules if k.startswith(("double_blocks.", "single_blocks."))),
                           default=-1) + 1):
        for xlabs, original in _XLABS.items():
            name, _, part = original.format(block).partition(":")
            if name in modules:
                target = modules[name][:3] if part == "qkv" else modules[name]
                out[xlabs.format(block)] = target
                if part == "qkv":
                    out[f"single_blocks.{block}.linear1_qkv"] = target
    return out


def stacked_rows(names: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[str, Rows], ...]:
    """Each of ``names`` (diffusers weights that one original weight stacks row-wise, in this order: a
    fused qkv's to_q, to_k, to_v) with its rows of the fused weight, the row counts from ``shapes``.
    A LoRA on the fused module spreads over them by these rows (nodes.lora_keys)."""
    out, start = [], 0
    for name in names:
        rows = shapes[name][0]
        out.append((name, ((start, start + rows),)))
        start += rows
    return tuple(out)


@dataclass(frozen=True)
class Into:
    """An original module that is rows ``start:stop`` of one diffusers weight ``param`` (its bias alike):
    the opposite of :func:`stacked_rows`, where diffusers fuses what the original layout keeps apart
    (Ovis-Image's up and gate projections, one MLP input in diffusers). A LoRA on it patches those rows
    alone, beside the other modules' (nodes.lora_keys, nodes.runtime.patches.Stacked)."""

    param: str
    start: int
    stop: int


def renamed_lora_modules(names: Any, to_original_name: Any) -> dict[str, str]:
    """Original module name -> diffusers weight name for every linear weight among ``names`` (a diffusers
    model's parameter names) that ``to_original_name`` renames one to one: the names LoRAs written against
    a family's original layout use (Krea 2's, Wan's)."""
    out = {}
    for name in names:
        if name.endswith(".weight"):
            original = to_original_name(name)
            if original != name and original.endswith(".weight"):
                out[original[: -len(".weight")]] = name
    return out


def renamed_by_table(key: str, forward: bool, starts: Any, pieces: Any,
                     middle: Callable[[str, bool], str] | None = None) -> str:
    """``key`` in the other layout by (original, diffusers) tables (``forward``: original -> diffusers):
    the first of ``starts`` the name begins with, then ``middle(key, forward)`` if given, then every one of
    ``pieces`` inside the name (Krea 2's and Wan's key maps)."""
    for original, diffusers in starts:
        a, b = (original, diffusers) if forward else (diffusers, original)
        if key.startswith(a):
            key = b + key[len(a):]
            break
    if middle is not None:
        key = middle(key, forward)
    for original, diffusers in pieces:
        key = key.replace(original, diffusers) if forward else key.replace(diffusers, original)
    return key
