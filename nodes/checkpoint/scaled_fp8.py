"""ComfyUI's "scaled" fp8 files: fp8 weights that each carry the number they were divided by.

Comfy-Org ships many models (FLUX ``*fp8_scaled``, ``t5xxl_fp8_e4m3fn_scaled``, Chroma, SD3.5...) with
each quantised linear weight ``W`` stored as ``fp8(W / s)`` beside a float32 ``<layer>.scale_weight``
``s``, and a ``scaled_fp8`` marker tensor (empty; its dtype names the fp8 type, float32 meaning
e4m3fn). The true weight is ``fp8 * s``: ComfyUI's scaled fp8 linear layer multiplies the weight,
cast to the compute dtype, by ``s`` cast to the same dtype, for every call. Some files also store a
``<layer>.scale_input``: ComfyUI reads it only when it multiplies in fp8 itself (``torch._scaled_mm``
on cards that can, with the fp8 optimisation the marker's two-element form turns off); the plain
cast-and-multiply path it takes otherwise ignores it. Kiln always casts, so it is consumed and unused.

Newer Comfy-Org files ("fp8mixed", and those its quantisation tools write) mark each quantised layer
instead: ``<layer>.comfy_quant`` is a uint8 tensor holding UTF-8 JSON such as
``{"format": "float8_e4m3fn"}`` (ComfyUI's MixedPrecisionOps reads it), the scale is
``<layer>.weight_scale`` (one float32; the weight is again ``fp8 * scale``, ComfyUI's fp8 layout
dequantising as ``qdata.to(dtype) * scale``) and ``<layer>.input_scale`` again only feeds the fp8
matmul. Unmarked layers hold plain weights. The same marker names Comfy-Org's int8 files:
``{"format": "int8_tensorwise"}`` is an int8 weight times its ``weight_scale`` (one number, or one
per output row), and with ``"convrot": true`` (``*_int8_convrot`` files; the two keys may also sit in
a nested ``"params"``) the weight is stored with its columns rotated in groups of
``convrot_groupsize`` (default 256; nodes.runtime.convrot), which the layer undoes by rotating its
input. Those formats (``float8_e4m3fn``, ``float8_e5m2``, ``int8_tensorwise``) load here; any other
(``nvfp4``: 4-bit blocks with two scales) is refused by name.

This module is the one place these keys are understood, for every family:

* :func:`take` removes the marker and the scales from a state before a family's loader sees it
  (checked: a scale names a weight the file holds, and is one number or one per output row); a
  rotated layer's scale carries its group size as a second column, so it follows every key
  conversion with the scale;
* :func:`follow` sends the scales through the family's own key conversion, so a fused ``qkv``
  weight split into q, k and v gives each part its rows of the scale (per-tensor scales are
  widened to one per row first, which every conversion of linear weights keeps: they only
  rename, split, swap or stack rows);
* :func:`attach` gives each layer its scale: a CastLinear that keeps its weight fp8 multiplies per
  call (nodes.runtime.fp8), a layer whose weight was cast to the compute dtype at load (T5's ``wo``)
  is multiplied once, in that dtype, as ComfyUI would per call. A FLUX built straight into disk
  blocks (nodes.checkpoint.flux_blocks) gets its scales on the meta module, before any block is
  read, so each block file is written with them (they are buffers, which the block files carry);
* :func:`fill_as_stored` is how the split-file loaders finish a model built empty: weights held as
  stored, then :func:`attach`.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Callable

MARKER = "scaled_fp8"
WEIGHT_SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"
#: the newer per-layer vocabulary: marker, weight scale, input scale
QUANT = ".comfy_quant"
QUANT_WEIGHT_SCALE = ".weight_scale"
QUANT_INPUT_SCALE = ".input_scale"
#: the comfy_quant formats whose weight is one fp8 tensor times one scale
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
#: the comfy_quant format whose weight is int8 times one scale (per row or per tensor), maybe rotated
INT8_FORMAT = "int8_tensorwise"
#: comfy-kitchen's rotation group when a marker names none
DEFAULT_ROTATION_GROUP = 256
#: every key suffix this module consumes (for header-only sizes)
SUFFIXES = ("." + MARKER, WEIGHT_SCALE, INPUT_SCALE, QUANT, QUANT_WEIGHT_SCALE, QUANT_INPUT_SCALE)


def is_scaled(keys: Any) -> bool:
    """Whether a file's keys (any prefix) hold ComfyUI scaled fp8 weights, in either vocabulary."""
    return any(k == MARKER or k.endswith(("." + MARKER, WEIGHT_SCALE, QUANT)) for k in keys)


def header_sizes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any]
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, Any], int]:
    """A header's shapes and dtypes without the keys :func:`take` consumes, and the bytes the row scales
    will be held in (float32, one per output row of each scaled weight): a loader's size asked before
    anything is read then equals the built module's."""
    if not is_scaled(shapes):
        return shapes, dtypes, 0
    marked = {k[: -len(QUANT)] for k in shapes if k.endswith(QUANT)}
    scaled = {_scaled_layer(k, marked) for k in shapes if k.endswith((WEIGHT_SCALE, QUANT_WEIGHT_SCALE))}
    kept = {k: v for k, v in shapes.items() if k != MARKER and not k.endswith(SUFFIXES)}
    rows = sum(shapes[f"{layer}.weight"][0] for layer in scaled if f"{layer}.weight" in shapes)
    return kept, {k: dtypes[k] for k in kept}, 4 * rows


def _error(message: str) -> Exception:
    from nodes.checkpoint.load import CheckpointError

    return CheckpointError(message)


def _row_scale(scale: Any, weight_shape: tuple[int, ...], what: str, key: str) -> Any:
    """``scale`` as one float32 number per output row of a weight of ``weight_shape``, shape (rows, 1);
    a scale of any other shape is the file's error."""
    import torch

    rows = int(weight_shape[0]) if weight_shape else 0
    shape = tuple(scale.shape)
    fits = scale.is_floating_point() and len(weight_shape) == 2 and (
        scale.numel() == 1 or shape in ((rows,), (rows, 1)))
    if not fits:
        raise _error(f"{what}: {key} has shape {shape} ({str(scale.dtype).replace('torch.', '')}) for a weight of "
                     f"shape {tuple(weight_shape)}: a weight scale is one float or one per output row ({rows})")
    return scale.to(torch.float32).reshape(-1, 1).expand(rows, 1).contiguous()


def take(state: Mapping[str, Any], what: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """``state`` without the marker and scale tensors, and the weight scales by weight key
    (``<layer>.weight`` -> float32 (rows, 1)). A file with none gives ``(state, {})`` unchanged. Only
    the markers and scales are read: a LazyState stays lazy (a view without those keys).
    Raises CheckpointError naming ``what`` (the file) and the key for a scale with no weight or of a
    shape that is neither one number nor one per row."""
    import torch

    from nodes.checkpoint.tensors import LazyState, dtypes_of, shapes_of

    if not is_scaled(state.keys()):
        return state, {}
    shapes = shapes_of(state)
    marked = _marked_layers(state, what)
    consumed = {k for k in state if k == MARKER or k.endswith(("." + MARKER, QUANT))}
    scales = {}
    for key in state:
        layer = _scaled_layer(key, marked)
        if layer is None:
            continue
        consumed.add(key)
        if layer + ".weight" not in state:
            raise _error(f"{what}: {key} belongs to {layer}.weight, which the file does not hold")
        if key.endswith((WEIGHT_SCALE, QUANT_WEIGHT_SCALE)):
            scales[layer + ".weight"] = _row_scale(state[key], shapes[layer + ".weight"], what, key)
    dtypes = dtypes_of(state)
    for layer, (fmt, group) in sorted(marked.items()):
        weight = layer + ".weight"
        if weight not in state:
            raise _error(f"{what}: {layer}{QUANT} marks {weight}, which the file does not hold")
        if weight not in scales:
            raise _error(f"{what}: {layer}{QUANT} marks a {fmt} layer but the file holds no {layer}{QUANT_WEIGHT_SCALE}")
        if (fmt == INT8_FORMAT) != (dtypes[weight] == torch.int8):
            raise _error(f"{what}: {layer}{QUANT} marks {fmt} but {weight} is stored as "
                         f"{str(dtypes[weight]).replace('torch.', '')}")
        if group:
            if shapes[weight][1] % group:
                raise _error(f"{what}: {layer}{QUANT} rotates in groups of {group}, which do not divide "
                             f"{weight}'s {shapes[weight][1]} columns")
            scales[weight] = torch.cat([scales[weight], torch.full_like(scales[weight], float(group))], dim=1)
    if isinstance(state, LazyState):
        return state.renamed({k: k for k in state if k not in consumed}), scales
    return {k: v for k, v in state.items() if k not in consumed}, scales


def _scaled_layer(key: str, marked: Collection[str]) -> str | None:
    """The layer a scale key belongs to (None: not a scale key). The newer names count only on layers
    a ``comfy_quant`` marks, since other formats use ``weight_scale`` in their own ways."""
    for suffix in (WEIGHT_SCALE, INPUT_SCALE):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    for suffix in (QUANT_WEIGHT_SCALE, QUANT_INPUT_SCALE):
        if key.endswith(suffix) and key[: -len(suffix)] in marked:
            return key[: -len(suffix)]
    return None


def _marked_layers(state: Mapping[str, Any], what: str) -> dict[str, tuple[str, int]]:
    """The layers a ``comfy_quant`` marks -> (format, rotation group or 0), each format checked to be one
    Kiln loads and each group one the rotation is defined for."""
    import json

    from nodes.runtime.convrot import is_group_size

    marked = {}
    for key in state:
        if not key.endswith(QUANT):
            continue
        try:
            config = json.loads(bytes(state[key].reshape(-1).tolist()).decode("utf-8"))
            fmt = config.get("format")
            params = config.get("params") if isinstance(config.get("params"), dict) else {}
            rotated = fmt == INT8_FORMAT and bool(config.get("convrot", params.get("convrot", False)))
            group = int(config.get("convrot_groupsize", params.get("convrot_groupsize", DEFAULT_ROTATION_GROUP)))
        except (ValueError, TypeError, AttributeError):
            raise _error(f"{what}: {key} is not the JSON a comfy_quant marker holds") from None
        if fmt not in (*FP8_FORMATS, INT8_FORMAT):
            raise _error(f"{what}: {key} marks the quantisation format {fmt!r}; Kiln loads "
                         f"{', '.join(FP8_FORMATS)} and {INT8_FORMAT} layers only")
        if rotated and not is_group_size(group):
            raise _error(f"{what}: {key} rotates in groups of {group}; ConvRot groups are powers of 4")
        marked[key[: -len(QUANT)]] = (fmt, group if rotated else 0)
    return marked


def follow(scales: dict[str, Any], shapes: Mapping[str, tuple[int, ...]],
           convert: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The row scales under the names ``convert`` (a family's key conversion) gives their weights.

    ``convert`` runs on a stand-in for the state of these tensor ``shapes`` (its keys after
    :func:`take`): each scaled weight replaced by its (rows, 1) scale, every other tensor by an empty
    one of its shape on the meta device (nothing read or allocated), so whatever the conversion does
    to a weight's rows it does to the scale's; what comes out off the meta device is a scale."""
    if not scales:
        return {}
    import torch

    stand_in = {k: scales[k] if k in scales else torch.empty(tuple(shape), device="meta")
                for k, shape in shapes.items()}
    return {k: v for k, v in convert(stand_in).items() if v.device.type != "meta"}


def attach(model: Any, scales: dict[str, Any], what: str) -> Any:
    """Give each of ``model``'s scaled layers its scale (module docstring); returns ``model``.
    ``scales``: row scales under the model's own weight names (:func:`follow`)."""
    import torch

    from nodes.runtime.fp8 import as_cast_linear, cast_linear_class, dequantised, set_weight_scale

    for key, scale in scales.items():
        owner = key[: -len(".weight")]
        try:
            layer = model.get_submodule(owner)
        except AttributeError:
            raise _error(f"{what}: a weight scale for {owner}, a layer the model does not have") from None
        weight = layer.weight
        if scale.shape[0] != weight.shape[0]:
            raise _error(f"{what}: the scale for {key} has {scale.shape[0]} rows, the weight {weight.shape[0]}")
        group = int(scale[0, 1]) if scale.shape[1] == 2 else 0  # a rotated layer's group (see take)
        scale = scale[:, :1].contiguous()
        if type(layer) is cast_linear_class() or weight.is_meta:  # meta: built into disk blocks, all CastLinear
            as_cast_linear(layer)
            set_weight_scale(layer, scale, group)
        else:  # held as a plain float at load (the compute dtype, or float32 for a layer the model keeps in
            # float32, T5's wo; an int8 weight there too): dequantised once, in that dtype
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            layer.weight = torch.nn.Parameter(dequantised(weight, scale, group, dtype), requires_grad=False)
    return model


def fill_as_stored(model: Any, state: Mapping[str, Any], scales: dict[str, Any], dtype: Any, what: str,
                   label: str) -> Any:
    """``model`` (built empty) filled from ``state`` under the model's own names: linear weights held
    as stored (an fp8 file's stay fp8, cast per layer: nodes.runtime.fp8.keep_linears_as_stored), the
    rest in ``dtype``; then given its ``scales`` (:func:`attach`). A key that does not fit is a
    CheckpointError naming the file (``what``) and the part (``label``, e.g. "Qwen3 text encoder (x)").
    One rule for every split-file loader (FLUX-shaped transformers, Qwen-Image's, the Qwen text encoders)."""
    from nodes.checkpoint.load import CheckpointError, _assign
    from nodes.runtime.fp8 import keep_linears_as_stored

    held = keep_linears_as_stored(model, dict(state), dtype)
    try:
        model = _assign(model, held, label, None)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    return attach(model, scales, what)
