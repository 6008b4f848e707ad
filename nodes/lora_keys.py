"""LoRA files as people download them, matched to the modules of a loaded model.

Formats read (one file may mix them):

* kohya / A1111: ``lora_unet_<module>``, ``lora_te_<module>`` (``lora_te1_`` and
  ``lora_te2_`` for SDXL's two encoders) with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; the module path with dots written as
  underscores, in diffusers' UNet naming (kohya's SD 1.x/2.x trainer) or the
  original one (``input_blocks_4_1_...``, kohya's SDXL trainer). LoCon adds the
  same keys for convolutions (``[rank, in, kh, kw]`` down factors).
* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (also the
  older ``.lora.down.weight`` / ``.lora.up.weight``), ``text_encoder.``/
  ``text_encoder_2.`` for the encoders; ComfyUI-saved ``diffusion_model.<original
  module>`` keys too.
* FLUX: diffusers' ``transformer.<module>`` (FluxLoraLoaderMixin.save_lora_weights),
  the original (BFL) layout as ComfyUI and kohya's FLUX trainer write it
  (``diffusion_model.double_blocks.0.img_attn.qkv``, ``lora_unet_double_blocks_0_img_attn_qkv``;
  its T5 as ``lora_te3_``);
  a LoRA on a fused original module (``qkv``, ``linear1``) is split row-wise onto
  the separate diffusers projections (the family's key map, ``Family.lora_modules``);
  the other families with a fused qkv in their original layout (Z-Image, Ideogram 4) alike.
  XLabs' layout (its FLUX trainer, ByteDance's USO and UNO LoRAs): ``double_blocks.0.processor.qkv_lora1``
  (``qkv_lora2``, ``proj_lora1``, ``proj_lora2``: image and text attention), ``single_blocks.0.processor.qkv_lora``
  (the q, k, v rows of ``linear1``) and ``proj_lora`` (``linear2``), with ``.down.weight`` / ``.up.weight``
  factors and no alpha, as diffusers' FluxLoraLoaderMixin reads them.
  The opposite, an original module that is part of one diffusers weight (Ovis-Image's ``img_mlp.up_proj``
  and ``gate_proj``, which diffusers fuses into ``ff.net.0.proj``: ``flux_keys.Into``), patches its rows of it;
  the file's modules on the other rows join that patch (``patches.Stacked``).
* Whole differences, under any of the module names above (ComfyUI applies them as
  ``weight += strength * diff``): ``<module>.diff`` for the weight (LyCORIS "full"
  modules, also on norms and other 1-D weights), ``<module>.diff_b`` for the bias,
  LyCORIS' ``.w_norm`` / ``.b_norm`` for a norm's weight and bias, and a LoRA's own
  bias (``.lora_B.bias``, ``.lora_up.bias``: PEFT with ``lora_bias``, BFL's control
  LoRAs), which adds ``alpha / rank * bias`` to the layer's bias (PEFT scales the whole
  ``lora_B`` output; ComfyUI reads BFL's, which have no alpha, as a plain ``diff_b``).
* LyCORIS LoHa (``.hada_w1_a`` ...) and LoKr (``.lokr_w1`` ...) modules, under the same module
  names, with or without Tucker cores; their formulas are in nodes.runtime.lycoris.
* DoRA: a ``<module>.dora_scale`` (LyCORIS, kohya) or ``.lora_magnitude_vector`` (peft) beside any of
  those factors (nodes.runtime.dora).

Module names are matched against the model itself (its parameter names, plus the
original-layout names computed by Kiln's own diffusers -> original converter), so
the rule cannot drift from the networks. Anything not matched is reported, and a
file matching nothing is an error, never a silent no-op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nodes.checkpoint.flux_keys import Into
from nodes.runtime import lycoris
from nodes.runtime.patches import Diff, LowRank, Stacked, stacked

#: (suffix of the "down" factor, suffix of the "up" factor)
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
          (".lora.down.weight", ".lora.up.weight"), (".down.weight", ".up.weight"))  # the last: XLabs'
#: (suffix of a whole difference, what it adds to: the module's "weight", its "bias", or its bias
#: as a LoRA's own bias, "lora_bias", scaled like the pair)
_DIFFS = ((".diff_b", "bias"), (".diff", "weight"), (".w_norm", "weight"), (".b_norm", "bias"),
          (".lora_B.bias", "lora_bias"), (".lora_up.bias", "lora_bias"), (".lora.up.bias", "lora_bias"))
#: DoRA magnitudes: LyCORIS/kohya's ``dora_scale`` (its axis by its shape, nodes.runtime.dora.axis) and
#: peft's ``lora_magnitude_vector`` (always one per output row: ``[out]``, ``[1, out, 1, 1]`` for a conv)
_MAGNITUDES = ((".dora_scale", "dora_scale"), (".lora_magnitude_vector.weight", "magnitude"),
               (".lora_magnitude_vector", "magnitude"))
#: kohya prefix -> target module of the model or CLIP. kohya and ComfyUI number text encoders
#: by kind (te1 CLIP-L, te2 CLIP-G, te3 T5); FLUX keeps its T5 as text_encoder_2, and a T5 name
#: never matches SDXL's CLIP-G there, so te3 can point at text_encoder_2 for every family.
_KOHYA_TARGETS = (("lora_unet_", "unet"), ("lora_transformer_", "unet"), ("lycoris_", "unet"),  # SimpleTuner's
                  ("lora_te1_", "text_encoder"),
                  ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_2"), ("lora_te_", "text_encoder"))
_DOTTED_TARGETS = (("unet.", "unet"), ("transformer.", "unet"), ("diffusion_model.", "unet"),
                   ("model.diffusion_model.", "unet"),
                   ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
                   ("lora_unet.", "unet"),
                   ("base_model.model.", "unet"),  # PEFT adapters saved from a bare model (AI-Toolkit's Krea 2)
                   ("conditional_transformer.", "unet"),  # Ideogram 4's (diffusers' conversion reads it)
                   # ComfyUI's own files (its LoraSave, Kiln's): each encoder by ComfyUI's name for it
                   ("text_encoders.clip_l.transformer.", "text_encoder"),
                   ("text_encoders.clip_h.transformer.", "text_encoder"),
                   ("text_encoders.clip_g.transformer.", "text_encoder_2"),
                   ("text_encoders.t5xxl.transformer.", "text_encoder_2"),
                   # last: bare module names (lightx2v's Qwen-Image-Lightning files), the network's own
                   ("", "unet"))


class LoraError(ValueError):
    """A LoRA file that does not fit the model; the message says why."""


@dataclass
class Matched:
    """Factors by target and parameter name, and what could not be matched."""

    tables: dict[str, dict[str, LowRank | Diff | lycoris.Product]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # name fits, shape does not
    refused: list[str] = field(default_factory=list)  # fits, but Kiln cannot apply it exactly (why)

    @property
    def count(self) -> int:
        return sum(len(t) for t in self.tables.values())


def module_names(network: Any, target: str, unet_config: dict | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every name a LoRA may use for a weight of ``network`` -> its parameter name.

    Names are given both dotted and kohya-underscored; for a UNet also in the
    original layout; for a text encoder with and without transformers'
    ``text_model.`` prefix. ``extra``: the family's own module names
    (``Family.lora_modules``), a parameter name or fused parts each.
    """
    # 1-D weights (norms) too: a file's whole differences may address them (factor pairs never fit them)
    weights = [n for n, p in network.named_parameters() if n.endswith(".weight")]
    names: dict[str, Any] = {}

    def add(alias: str, param: Any) -> None:
        names.setdefault(alias, param)
        names.setdefault(alias.replace(".", "_"), param)

    for param in weights:
        module = param[: -len(".weight")]
        add(module, param)
        if target != "unet":
            bare = module[len("text_model."):] if module.startswith("text_model.") else module
            add(bare, param)
            add("text_model." + bare, param)
    if target == "unet" and unet_config is not None and "block_out_channels" in unet_config:  # a UNet's LDM names
        from nodes.checkpoint.to_original import unet_to_original

        original = unet_to_original({p: p for p in weights}, unet_config)
        for key, param in original.items():
            add(key[len("model.diffusion_model."): -len(".weight")], param)
    for alias, param in (extra or {}).items():
        add(alias, param)
    return names


def network_keys(keys: Any) -> list[str]:
    """The keys of a LoRA file that address a diffusion network (UNet or transformer), by prefix."""
    prefixes = tuple(p for p, t in _KOHYA_TARGETS + _DOTTED_TARGETS if t == "unet" and p)
    return [k for k in keys if k.startswith(prefixes)]


def made_for(keys: Any) -> str | None:
    """The model family a LoRA's network names point to ("FLUX" or "SD"), for error messages."""
    text = " ".join(network_keys(keys))
    if any(m in text for m in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return "FLUX"
    if any(m in text for m in ("down_blocks", "input_blocks", "up_blocks", "output_blocks", "mid_block")):
        return "SD"
    return None


def _split(key: str) -> tuple[str, str] | None:
    """(module key, "down" | "up" | "alpha" | a _DIFFS suffix | a LyCORIS part name) of a LoRA tensor
    key, or None."""
    for suffix in lycoris.SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    for suffix, _ in _DIFFS:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    for down, up in _PAIRS:
        if key.endswith(down):
            return key[: -len(down)], "down"
        if key.endswith(up):
            return key[: -len(up)], "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    for suffix, part in _MAGNITUDES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _locate(module_key: str, lookups: dict[str, dict[str, Any]],
            encoders: tuple[tuple[str, str], ...] = ()) -> tuple[str, Any] | None:
    """(target, parameter name) of a LoRA module key in the model's name tables; ``encoders`` (prefix,
    target) pairs, the CLIP's own text encoder names, are tried first."""
    for prefix, target in encoders:
        if module_key.startswith(prefix) and target in lookups:
            param = lookups[target].get(module_key[len(prefix):])
            return (target, param) if param else None
    for prefix, target in _KOHYA_TARGETS:
        if module_key.startswith(prefix) and target in lookups:
            param = lookups[target].get(module_key[len(prefix):])
            return (target, param) if param else None
    for prefix, target in _DOTTED_TARGETS:
        if module_key.startswith(prefix) and target in lookups:
            param = lookups[target].get(module_key[len(prefix):])
            return (target, param) if param else None
    return None


def match(state: dict[str, Any], lookups: dict[str, dict[str, str]], shapes: dict[str, dict[str, tuple]],
          encoders: tuple[tuple[str, str], ...] = ()) -> Matched:
    """Pair up the file's factors, read its whole differences, and find the parameter each patches.

    ``lookups``: target -> name table (:func:`module_names`); ``shapes``: target ->
    parameter name -> shape, to refuse factors of another architecture; ``encoders``: the CLIP's
    ``text_encoders.<name>.transformer.`` prefixes and the encoder each names (:func:`encoder_prefixes`).
    """
    groups: dict[str, dict[str, Any]] = {}
    result = Matched()
    for key, value in state.items():
        split = _split(key)
        if split is None:
            result.unmatched.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
    for module_key, parts in sorted(groups.items()):
        has_pair = "down" in parts and "up" in parts
        lyco = [k for k in parts if "." + k in lycoris.SUFFIXES]
        magnitude = next((p for _, p in _MAGNITUDES if p in parts), None)
        diffs = [k for k in parts if k not in ("down", "up", "alpha", "dora_scale", "magnitude") and k not in lyco]
        if ("down" in parts) != ("up" in parts) or not (has_pair or diffs or lyco):
            lone = magnitude is not None and not (has_pair or diffs or lyco)
            result.unmatched.append(f"{module_key}.{magnitude} (no LoRA, LoHa or LoKr factors beside it)" if lone
                                    else module_key)
            continue
        found = _locate(module_key, lookups, encoders)
        if found is None:
            result.unmatched.append(module_key)
            continue
        target, param = found
        into, sizes = (param, _part_shapes(param, shapes[target])) if isinstance(param, Into) else \
            (None, shapes[target])
        param = into.param if into is not None else param
        alpha = parts.get("alpha")
        patches: list[tuple[str, Any]] = []
        if has_pair:
            pair = _pair(module_key, param, parts["down"], parts["up"], alpha, sizes, result)
            if pair is None:
                continue
            patches += pair
        if lyco:
            patches += _product(module_key, param, parts, alpha, sizes, result) or []
        for suffix in diffs:
            diff = _diff(module_key + suffix, param, parts[suffix], dict(_DIFFS)[suffix], alpha, parts.get("down"),
                         sizes, result)
            patches += diff or []
        if magnitude is not None:
            patches = _decomposed(module_key, param, parts[magnitude], magnitude, patches, sizes, result)
        if into is not None:  # its rows of the model's parameter
            patches = [(n, stacked(shapes[target][n], ((into.start, into.stop, p),))) for n, p in patches]
        table = result.tables.setdefault(target, {}) if patches else {}
        for name, patch in patches:
            both = table[name].joined(patch) if isinstance(table.get(name), Stacked) and \
                isinstance(patch, Stacked) else None
            if both is not None:  # another part of the same parameter (Ovis' gate beside its up projection)
                table[name] = both
            elif name in table:  # one file giving a parameter twice: keep the first, say so
                result.unmatched.append(f"{module_key} (a second patch for {name})")
            else:
                table[name] = patch
    return result


def encoder_prefixes(family: Any) -> tuple[tuple[str, str], ...]:
    """``(text_encoders.<name>.transformer., module)`` for each of a CLIP family's text encoders, by the
    names saved files use (nodes.families.encoder_names: ComfyUI's, and LoraSave's): where the fixed
    table would miss (SD3's T5 is its third encoder, Chroma's and PixArt's its first; Qwen's and Gemma's
    have names of their own)."""
    from nodes.families.encoder_names import clip_file_name

    return tuple((f"text_encoders.{clip_file_name(family, spec)}.transformer.", spec.module)
                 for spec in family.text_encoders)


def _part_shapes(into: Into, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """``shapes`` with the weight (and bias) ``into`` is part of cut to its rows: the module's own sizes."""
    out = dict(shapes)
    for name in (into.param, into.param[: -len(".weight")] + ".bias"):
        if name in shapes:
            out[name] = (into.stop - into.start, *shapes[name][1:])
    return out


def _rows(param: Any, tensor: Any, bias: bool) -> list[tuple[str, Any]]:
    """(parameter name, its part of ``tensor``) for a module's weight or bias: one piece, or the
    rows of a fused original module spread over the separate diffusers parameters."""
    import torch

    def name(weight: str) -> str:
        return weight[: -len(".weight")] + ".bias" if bias else weight

    if isinstance(param, str):
        return [(name(param), tensor)]
    return [(name(p), torch.cat([tensor[a:b] for a, b in rows])) for p, rows in param]


def _fused_rows(param: Any) -> int | None:
    return None if isinstance(param, str) else sum(b - a for _, rows in param for a, b in rows)


def _pair(module_key: str, param: Any, down: Any, up: Any, alpha: Any, shapes: dict[str, tuple],
          result: Matched) -> list[tuple[str, LowRank]] | None:
    """The factor pair as LowRank patches, or None (recorded as mismatched) when it does not fit."""
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    total = _fused_rows(param)
    if total is not None and up.shape[0] != total:
        result.mismatched.append(f"{module_key} {tuple(up.shape[:1]) + tuple(down.shape[1:])} vs {total} rows")
        return None
    pieces = _rows(param, up, bias=False)
    bad = [p for p, u in pieces if not _fits(u, down, shapes[p])]
    if bad:
        result.mismatched.append(f"{module_key} {tuple(up.shape[:1]) + tuple(down.shape[1:])} vs {shapes[bad[0]]}")
        return None
    return [(name, LowRank(piece.float(), down.float(), scale)) for name, piece in pieces]


def _diff(key: str, param: Any, diff: Any, kind: str, alpha: Any, down: Any, shapes: dict[str, tuple],
          result: Matched) -> list[tuple[str, Diff]] | None:
    """A whole difference as Diff patches, or None (recorded) when the layer has no such parameter
    (a bias difference for a layer without a bias: unmatched) or its shape differs (mismatched)."""
    bias = kind != "weight"
    scale = float(alpha) / down.shape[0] if kind == "lora_bias" and alpha is not None and down is not None else 1.0
    total = _fused_rows(param)
    if total is not None and diff.shape[0] != total:
        result.mismatched.append(f"{key} {tuple(diff.shape)} vs {total} rows")
        return None
    pieces = _rows(param, diff, bias)
    missing = [p for p, _ in pieces if p not in shapes]
    if missing:
        result.unmatched.append(f"{key} (the layer has no {missing[0].rsplit('.', 1)[1]})")
        return None
    bad = [p for p, d in pieces if tuple(d.shape) != tuple(shapes[p])]
    if bad:
        result.mismatched.append(f"{key} {tuple(diff.shape)} vs {shapes[bad[0]]}")
        return None
    return [(name, Diff(piece.float(), scale)) for name, piece in pieces]


def _product(module_key: str, param: Any, parts: dict[str, Any], alpha: Any, shapes: dict[str, tuple],
             result: Matched) -> list[tuple[str, lycoris.Product]] | None:
    """A LoHa / LoKr module as Product patches (a fused module's rows spread like ``_rows``), or None
    (recorded: unmatched when its tensors are incomplete, mismatched when its size differs)."""
    read = lycoris.read(parts, alpha)
    if isinstance(read, str):
        result.unmatched.append(f"{module_key} ({read})")
        return None
    kind, factors, scale = read
    factors = {k: v.float() for k, v in factors.items()}
    full = lycoris.full_shape(kind, factors)
    total = _fused_rows(param)
    names = [(param, None)] if isinstance(param, str) else [(p, tuple(rows)) for p, rows in param]
    wanted = [shapes[p] for p, _ in names]
    numel = sum(_numel(s) for s in wanted)
    if full[0] != (total if total is not None else wanted[0][0]) or _numel(full) != numel:
        result.mismatched.append(f"{module_key} {full} vs {wanted[0] if total is None else f'{total} rows'}")
        return None
    return [(p, lycoris.Product(kind, factors, scale, shapes[p], rows)) for p, rows in names]


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fits(up: Any, down: Any, shape: tuple) -> bool:
    """Whether ``up @ down`` has the weight's shape (a LoCon conv factor flattened)."""
    return up.shape[0] == shape[0] and up.flatten(1).shape[1] == down.shape[0] and \
        up.shape[0] * down.flatten(1).shape[1] == _numel(shape)


def _decomposed(module_key: str, param: Any, scale: Any, part: str, patches: list[tuple[str, Any]],
                shapes: dict[str, tuple], result: Matched) -> list[tuple[str, Any]]:
    """A DoRA module: its weight patch (LoRA pair, LoHa or LoKr) wrapped with its ``dora_scale``
    (nodes.runtime.dora; a fused module's magnitudes split by rows like its factors). A magnitude
    fitting no axis is mismatched; one per input channel of a fused module Kiln holds as separate
    layers is refused (its norms span all of them); a ``dora_scale`` with no factors beside it is
    unmatched. ``part``: "dora_scale" (axis by shape) or peft's "magnitude" (per output row).
    Other patches of the module (its bias) pass through."""
    from nodes.runtime.dora import Dora, axis

    weights = [(n, p) for n, p in patches if n.endswith(".weight") and hasattr(p, "delta")
               and not isinstance(p, Diff)]
    if not weights:
        result.unmatched.append(f"{module_key}.{part} (no LoRA, LoHa or LoKr factors beside it)")
        return patches
    total = _fused_rows(param)
    whole = (total, *shapes[weights[0][0]][1:]) if total is not None else shapes[weights[0][0]]
    if part == "magnitude":
        on = "out" if scale.numel() == whole[0] else None
    else:
        on = axis(tuple(scale.shape), tuple(whole))
    if on is None:
        result.mismatched.append(f"{module_key}.{part} {tuple(scale.shape)} vs {tuple(whole)}")
        return []
    if on == "in" and total is not None and len(param) > 1:
        result.refused.append(f"{module_key}: its dora_scale normalises input channels across a fused layer that "
                              "this model holds as separate layers (only per-output-row DoRA is supported there)")
        return []
    magnitude = scale.float().flatten()
    pieces = dict(_rows(param, magnitude, bias=False)) if on == "out" else {}
    wrapped = {n for n, _ in weights}
    return [(n, Dora(p, pieces.get(n, magnitude), on) if n in wrapped else p) for n, p in patches]
