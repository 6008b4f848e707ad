"""Weights stored in 8-bit floats, computed in the compute dtype one layer at a time.

FLUX's transformer is 12 B parameters: 24 GB in bf16, 12 GB as ``float8_e4m3fn``
(the ``flux1-dev-fp8`` files). Kiln keeps such weights in fp8 in memory (on the
GPU and on the CPU) and casts each linear layer's weight to the compute dtype
(bf16/fp16 on a GPU, fp32 on a CPU) only while that layer runs, so the full-size
copy never exists. Only ``nn.Linear`` weights stay fp8 (they are >99 % of the
bytes); norms, embeddings and biases are cast once at load. The same holds for any
linear weight stored narrower than the compute dtype (bf16 FLUX or fp16 T5 files on a
CPU computing in fp32; :func:`held_dtype` is the rule). LoRAs on such layers run
beside the weight (low rank, in the compute dtype) instead of being added into it.
The same layer classes serve a model paged to disk (nodes.runtime.offload), with run-time
patched convolutions and norms beside CastLinear (``as_run_time_patched``). Int8 weights (ComfyUI's
``int8_tensorwise`` files, nodes.checkpoint.scaled_fp8) are held the same way: cast per call and
multiplied by their scale, their input rotated first when the file stored them rotated
(nodes.runtime.convrot).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from nodes.runtime.convrot import rotate

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def is_fp8(t: Any) -> bool:
    return str(t.dtype).replace("torch.", "") in FP8_DTYPES


def is_int8(t: Any) -> bool:
    """An int8 tensor: a quantised linear weight (it is only ever one of those here)."""
    return str(t.dtype) == "torch.int8"


def _cast_linear_class():
    import torch

    class CastLinear(torch.nn.Linear):
        """nn.Linear whose stored weight may be fp8: cast per call to the input's dtype.

        ``kiln_lora``, set only while LoRA patches are applied (nodes.runtime.patches):
        ``(up, down, coefficient)`` factors added as ``coefficient * (x @ down.T) @ up.T``,
        because adding a LoRA's small delta into fp8 weights would round most of it away.
        A whole weight difference comes as ``(diff, None, c)`` (``c * x @ diff.T``), a bias
        difference as ``(diff, "bias", c)`` (``c * diff``; see ``patches.Diff.beside``), a LoHa / LoKr
        patch as ``(patch, "product", c)`` (``c * x @ patch.delta().T``; see ``runtime.lycoris``).
        A DoRA patch rescales the rows or columns of ``W + ΔW`` by norms of the weight itself, so it has
        no beside form: a layer with one among its patches gets them all as ``kiln_deltas`` instead
        (nodes.runtime.patches) and builds its whole patched weight for the call from the weight it
        read (:func:`_with_deltas`, as the run-time patched convolutions and norms do).
        """

        kiln_lora: tuple = ()

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            if vars(self).get("kiln_deltas"):  # an instance attribute: patches.patched routes by the class's
                return torch.nn.functional.linear(x, *_with_deltas(self, x.dtype))
            w = _scaled(self, self.weight.to(x.dtype))
            b = self.bias.to(x.dtype) if self.bias is not None else None
            group = rotation_group(self)  # a rotated int8 weight: rotate the input instead of the weight
            out = torch.nn.functional.linear(rotate(x, group) if group else x, w, b)
            for up, down, coefficient in self.kiln_lora:
                if down == "product":  # a LyCORIS LoHa / LoKr patch, rebuilt for this call
                    delta = up.delta(up.shape, x.device).to(x.dtype)
                    out = out + torch.nn.functional.linear(x, delta) * coefficient
                    continue
                if isinstance(down, str):  # "bias": a bias difference
                    out = out + up.to(x.dtype) * coefficient
                    continue
                h = x if down is None else torch.nn.functional.linear(x, down.to(x.dtype))
                out = out + torch.nn.functional.linear(h, up.to(x.dtype)) * coefficient
            return out

    return CastLinear


_CAST = None


def cast_linear_class() -> Any:
    """The one CastLinear class (made on first use, so importing this module needs no torch): every layer
    made CastLinear shares it, which is how :func:`as_plain` and :func:`widen` recognise them."""
    global _CAST
    if _CAST is None:
        _CAST = _cast_linear_class()
    return _CAST


def as_cast_linear(module: Any) -> Any:
    """Make one ``nn.Linear`` a CastLinear in place (same arithmetic when its weight is not fp8;
    LoRAs can then run beside the weight, see ``kiln_lora``)."""
    module.__class__ = cast_linear_class()
    return module


def _with_deltas(layer: Any, dtype: Any = None) -> tuple:
    """``layer``'s weight and bias with its ``kiln_deltas`` applied in order (see :func:`_run_time_classes`)
    in the in-place patch's arithmetic, float32 sums, then in ``dtype`` (default: as stored). A DoRA
    patch (nodes.runtime.dora) gives its whole new weight from the one reached so far."""
    import torch

    w, b = layer.weight, getattr(layer, "bias", None)  # RMSNorm has no bias
    if weight_scale(layer) is not None:
        w = effective_weight(layer, torch.float32)
    for kind, patch, strength in layer.kiln_deltas:
        t = (b if kind == "bias" else w).to(torch.float32)
        if hasattr(patch, "apply"):
            t = patch.apply(t, strength)
        else:
            t = t + patch.delta(tuple(t.shape), t.device) * strength
        w, b = (w, t) if kind == "bias" else (t, b)
    stored = (layer.weight, getattr(layer, "bias", None))  # a norm may have neither
    dtypes = [dtype or (s.dtype if s.is_floating_point() else torch.float32) if s is not None else None
              for s in stored]  # an int8 weight's patched form is a float
    return tuple(t.to(d) if t is not None else None for t, d in zip((w, b), dtypes))


def set_weight_scale(layer: Any, scale: Any, rotation: int = 0) -> None:
    """Give a CastLinear the scale its stored weight was divided by (ComfyUI's scaled fp8 and int8 files,
    nodes.checkpoint.scaled_fp8): one float32 per output row, shape (rows, 1). Held as a buffer left
    out of the state dict, so it moves with the layer between devices and the module's keys stay
    the model's own. ``rotation``: the ConvRot group its weight's columns were rotated in (0: none)."""
    layer.register_buffer("kiln_scale", scale, persistent=False)
    if rotation:
        layer.kiln_rotation = rotation


def weight_scale(layer: Any) -> Any:
    """The layer's weight scale (:func:`set_weight_scale`), None when its weight is stored as is."""
    return layer._buffers.get("kiln_scale")


def rotation_group(layer: Any) -> int:
    """The ConvRot group of the layer's stored weight (:func:`set_weight_scale`), 0 when not rotated."""
    return vars(layer).get("kiln_rotation", 0)


def dequantised(weight: Any, scale: Any, rotation: int, dtype: Any) -> Any:
    """The weight a layer computes with, in ``dtype``: the stored ``weight`` cast, times its row
    ``scale`` (None: none) in that dtype as ComfyUI's layers multiply it, its columns rotated back
    when stored rotated in groups of ``rotation``."""
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(dtype)
    return rotate(w, rotation) if rotation else w


def effective_weight(layer: Any, dtype: Any) -> Any:
    """:func:`dequantised` for one CastLinear (or plain linear) layer: what its forward multiplies by."""
    return dequantised(layer.weight, weight_scale(layer), rotation_group(layer), dtype)


def _scaled(layer: Any, w: Any) -> Any:
    """``w`` (the layer's weight already cast to the dtype it is used in) times the layer's scale cast to
    that dtype, as ComfyUI's scaled fp8 layer computes it; ``w`` itself when there is none."""
    scale = weight_scale(layer)
    return w if scale is None else w * scale.to(w.dtype)


def _run_time_classes() -> dict:
    """Layers that take their patches while they run (a model paged to disk, whose resting weights
    are placeholders, see nodes.runtime.offload): 2-D convolutions and group/layer/RMS norms, by class.

    ``kiln_deltas``, set only while patches are applied (nodes.runtime.patches):
    ``("weight" | "bias", patch, strength)``; the patch's own ``delta`` (the one the in-place path
    adds) times the strength is added to the tensor just brought in from its block file, for this
    call only, in the same order and arithmetic, so a paged UNet gives the merged UNet's result
    (any patch kind with a ``delta`` works). Running a LoCon's low-rank form beside the weight
    (``down`` with the layer's kernel, then ``up`` 1x1) would need no weight-sized temporary but
    rounds differently: a tiny SD1 job drifted 3e-5 on latents of magnitude 26. The temporary
    lives only while the layer runs, next to the weight itself.
    """
    import torch
    import torch.nn.functional as F

    class CastConv2d(torch.nn.Conv2d):
        kiln_deltas: tuple = ()

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            w, b = _with_deltas(self)
            return self._conv_forward(x, w.to(x.dtype), b.to(x.dtype) if b is not None else None)

    class CastGroupNorm(torch.nn.GroupNorm):
        kiln_deltas: tuple = ()

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            w, b = _with_deltas(self)
            return F.group_norm(x, self.num_groups, w, b, self.eps)

    class CastLayerNorm(torch.nn.LayerNorm):
        kiln_deltas: tuple = ()

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            w, b = _with_deltas(self)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    class CastRMSNorm(torch.nn.RMSNorm):  # FLUX's q/k norms
        kiln_deltas: tuple = ()

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            w, _ = _with_deltas(self)
            return F.rms_norm(x, self.normalized_shape, w, self.eps)

    return {torch.nn.Conv2d: CastConv2d, torch.nn.GroupNorm: CastGroupNorm, torch.nn.LayerNorm: CastLayerNorm,
            torch.nn.RMSNorm: CastRMSNorm}


_RUN_TIME: dict | None = None


def as_run_time_patched(module: Any) -> bool:
    """Make one plain ``nn.Conv2d`` / ``nn.GroupNorm`` / ``nn.LayerNorm`` / ``nn.RMSNorm`` its run-time-patched
    class in place (same arithmetic while no patch is set). False for any other layer."""
    global _RUN_TIME
    if _RUN_TIME is None:
        _RUN_TIME = _run_time_classes()
    cls = _RUN_TIME.get(type(module))
    if cls is not None:
        module.__class__ = cls
    return cls is not None


def as_plain(layer: Any, model: Any) -> bool:
    """Undo :func:`as_cast_linear` / :func:`as_run_time_patched` on one layer of ``model``, no longer
    paged (nodes.runtime.offload.make_whole): every run-time patched class, and a CastLinear whose
    weight rests in the model's compute dtype, go back to their torch class, so the whole model takes
    its patches in place again as one never paged does. A CastLinear holding its weight apart
    (:func:`stored_apart`: fp8, or kept narrow) or a scale (:func:`set_weight_scale`) stays: it casts per
    call. Returns whether it changed."""
    base = {cls: plain for plain, cls in (_RUN_TIME or {}).items()}.get(type(layer))
    if base is None and _CAST is not None and type(layer) is _CAST and not stored_apart(layer.weight, model) \
            and weight_scale(layer) is None:  # a scaled weight needs its CastLinear whatever it is stored in
        import torch

        base = torch.nn.Linear
    if base is not None:
        layer.__class__ = base
    return base is not None


def held_dtype(stored: Any, compute: Any, linear_weight: bool) -> Any:
    """The one rule of what a loaded tensor is held as. A linear layer's weight stays as stored when
    that is fp8 or any float narrower than the compute dtype (a bf16 FLUX or fp16 T5-XXL file run in
    fp32 on a CPU: half the memory), its layer casting it per call, which gives the very values an
    upcast at load would, so only memory changes. Every other float goes to the compute dtype; the
    rest stays as stored. The header-based sizes (nodes.checkpoint.flux_blocks.held_bytes) use it too."""
    if not stored.is_floating_point:
        return stored
    if linear_weight and (str(stored).replace("torch.", "") in FP8_DTYPES or stored.itemsize < compute.itemsize):
        return stored
    return compute


def keep_linears_as_stored(module: Any, state: dict[str, Any], compute_dtype: Any) -> dict[str, Any]:
    """Prepare ``state`` for ``module`` by :func:`held_dtype`: linear weights kept as stored make their
    layers CastLinear. Layers the model keeps in full precision (transformers' ``_keep_in_fp32_modules``:
    T5's ``wo``, before which T5 casts its activations to that weight's dtype) go to the compute dtype
    whatever they were stored in. Returns the new state."""
    cast_linear = cast_linear_class()
    linears = _narrowable_linears(module)
    out, cast = {}, {}  # cast: one converted copy per file tensor, so tied weights stay one tensor
    for k, v in state.items():
        owner = k.rsplit(".", 1)[0]
        linear_weight = k.endswith(".weight") and owner in linears
        held = held_dtype(v.dtype, compute_dtype, linear_weight)
        if held == v.dtype and held != compute_dtype and (v.is_floating_point() or (linear_weight and is_int8(v))):
            out[k] = v
            module.get_submodule(owner).__class__ = cast_linear
        else:
            out[k] = cast.setdefault(id(v), v.to(held))
    module.kiln_compute_dtype = compute_dtype
    return out


def _narrowable_linears(module: Any) -> set[str]:
    """Names of ``module``'s linear layers whose weight :func:`held_dtype` may keep as stored: all but
    those the model keeps in full precision (transformers' and diffusers' ``_keep_in_fp32_modules``: a
    layer named so or inside a module named so, e.g. JoyImage's ``time_embedder.linear_1``)."""
    import torch

    kept = getattr(module, "_keep_in_fp32_modules", None) or ()
    full = {kept} if isinstance(kept, str) else set(kept)
    return {name for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and not full & set(name.split("."))}


def held_bytes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any], compute_dtype: Any,
               is_linear_weight: Callable[[str, tuple[int, ...]], bool], fp8: Any = None) -> int:
    """Bytes tensors of these shapes and stored dtypes will be held in by :func:`held_dtype`, from a file's
    header alone: the size the model manager is asked about before anything is read.
    ``is_linear_weight(key, shape)`` says which are linear layers' weights; ``fp8`` (a torch dtype): what
    UNETLoader's weight_dtype turns those into first."""
    total = 0
    for key, shape in shapes.items():
        linear = is_linear_weight(key, shape)
        stored = fp8 if fp8 is not None and linear and dtypes[key].is_floating_point else dtypes[key]
        total += math.prod(shape) * held_dtype(stored, compute_dtype, linear).itemsize
    return total


def linear_weights_of(module: Any) -> Callable[[str, tuple[int, ...]], bool]:
    """:func:`held_bytes`' test for tensors under ``module``'s own names, as :func:`keep_linears_as_stored`
    decides them."""
    linears = _narrowable_linears(module)
    return lambda key, shape: key.endswith(".weight") and key.rsplit(".", 1)[0] in linears


def stored_apart(p: Any, module: Any) -> bool:
    """Whether parameter ``p`` of ``module`` rests in another dtype than the module computes in (fp8,
    or kept narrow): a patch must then run beside it, since adding into it would round the patch
    to the stored precision."""
    return is_fp8(p) or is_int8(p) or (p.is_floating_point() and p.dtype != compute_dtype(module))


def kept_as_stored(module: Any) -> str:
    """The dtype names (e.g. "fp8", "bf16") of the linear weights ``module`` holds apart from its compute
    dtype, joined; "" when none, for the loader's message."""
    return _short_names(p.dtype for p in module.parameters() if stored_apart(p, module))


def _short_names(dtypes: Any) -> str:
    """Storage dtypes as a loader's message names them ("bf16", "fp8"...), each once, joined by "/"."""
    short = {"float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
    return "/".join(sorted({short.get(str(d).replace("torch.", ""), str(d)) for d in dtypes}))


def _narrow_kept(module: Any) -> list[Any]:
    """CastLinear layers of ``module`` holding a bf16/fp16 weight only for being narrower than the compute
    dtype (not fp8: a fp8 file or UNETLoader's weight_dtype chose that storage; not a scaled one, whose
    scale only CastLinear applies)."""
    return [m for m in module.modules() if _CAST is not None and type(m) is _CAST
            and not is_fp8(m.weight) and stored_apart(m.weight, module) and weight_scale(m) is None]


def widening_bytes(module: Any) -> int:
    """Bytes :func:`widen` would add to ``module`` (0: nothing to widen)."""
    compute = compute_dtype(module)
    return sum(m.weight.numel() * (compute.itemsize - m.weight.element_size()) for m in _narrow_kept(module))


def widen(module: Any) -> str:
    """Upcast the narrow-kept linear weights of ``module`` to its compute dtype, layer by layer (the peak is
    the widened model plus one layer), and return their layers to torch's Linear, so LoRAs patch them in
    place. The values are those the per-call cast gave, so results do not change; a CPU step skips
    the casts (bench/flux_memory.py --storage all: a FLUX step about 40 % faster in fp32 than bf16-kept).
    Returns the dtype names widened (e.g. "bf16"), "" when none."""
    import torch

    compute = compute_dtype(module)
    layers = _narrow_kept(module)
    widened = _short_names(layer.weight.dtype for layer in layers)
    for layer in layers:
        layer.kiln_stored_dtype = layer.weight.dtype
        layer.weight = torch.nn.Parameter(layer.weight.detach().to(compute), requires_grad=False)
        layer.__class__ = torch.nn.Linear
    return widened


def narrow(module: Any) -> int:
    """Undo :func:`widen` (exactly: the upcast values round back to themselves), for a model that no longer
    fits whole: narrower is cheaper than paging it to disk. Returns the bytes freed."""
    import torch

    freed = 0
    for layer in module.modules():
        stored = vars(layer).pop("kiln_stored_dtype", None)
        if stored is not None:
            freed += layer.weight.numel() * (layer.weight.element_size() - stored.itemsize)
            layer.weight = torch.nn.Parameter(layer.weight.detach().to(stored), requires_grad=False)
            layer.__class__ = cast_linear_class()
    return freed


def fp8_bytes(module: Any) -> int:
    """Bytes of a module's parameters held in fp8."""
    return sum(p.numel() for p in module.parameters() if is_fp8(p))


def compute_dtype(module: Any) -> Any:
    """The dtype a module computes in: the one :func:`keep_linears_as_stored` was given, else its first
    parameter that is not fp8 (diffusers' ``.dtype`` reports the first parameter's, which for an fp8
    file is the storage dtype)."""
    if getattr(module, "kiln_compute_dtype", None) is not None:
        return module.kiln_compute_dtype
    for p in module.parameters():
        if p.is_floating_point() and not is_fp8(p):
            return p.dtype
    return module.dtype
