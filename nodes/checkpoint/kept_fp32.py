"""The modules a diffusers class keeps in float32, kept so by Kiln's loaders whatever they compute in.

diffusers' model classes may list ``_keep_in_fp32_modules`` (Krea 2's norms, JoyImage's time embedder,
Wan's...). ``from_pretrained(torch_dtype=bf16)`` then loads every floating tensor of its state dict
(parameters, weights and biases alike, and saved buffers) whose dotted name has one of those names as a
whole part (``condition_embedder.time_embedder.linear_1.bias`` for ``time_embedder``; ``img_norm1`` is not
``norm1``) as float32 from the file, the rest in bf16; the classes' forwards cast around them. Kiln's
loaders cast every float to the compute dtype first, so :func:`keep_in_fp32` puts those tensors back in
float32 *from the file*: a bf16 copy widened again would keep the rounding (Krea 2's ``1 + w`` norm
scales move by 1/128 steps in bf16), which is what makes the kept modules matter.

Each family says how a module's tensor name maps to the file's keys (``names``: its key conversion's
per-name rule, e.g. nodes.checkpoint.krea2_keys.to_original_name; the identity for a file in the module's
own layout, such as a diffusers folder). Tensors still on the meta device are skipped and those already
float32 left alone, so the same call serves as a build straight into disk blocks' per-block hook
(nodes.checkpoint.paged.build_paged's ``ready``, nodes.checkpoint.paged_files.FileLayout's ``after``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: ComfyUI's prefix for a diffusion model inside a file; a file's keys are looked up with and without it.
PREFIXES = ("", "model.diffusion_model.")
#: The stored dtypes read again in float32; fp8 / int8 weights (scaled files) keep their own storage,
#: as diffusers keeps quantised layers as its quantiser holds them.
_PLAIN_FLOATS = ("float16", "bfloat16", "float32", "float64")


def kept_modules(model: Any) -> tuple[str, ...]:
    """The module names ``model``'s class keeps in float32 (``_keep_in_fp32_modules``; () for none)."""
    kept = getattr(model, "_keep_in_fp32_modules", None) or ()
    return (kept,) if isinstance(kept, str) else tuple(kept)


def is_kept(name: str, kept: Iterable[str]) -> bool:
    """Whether a state-dict name falls under a kept module: one of its dotted parts is a kept name
    (diffusers' rule in load_model_dict_into_meta)."""
    parts = set(name.split("."))
    return any(k in parts for k in kept)


def _plain_float(dtype: Any) -> bool:
    return str(dtype).replace("torch.", "") in _PLAIN_FLOATS


def widened_bytes(model: Any, tensors: Mapping[str, tuple[tuple[int, ...], Any]]) -> int:
    """The bytes :func:`keep_in_fp32` adds to ``model`` over ``tensors`` (module name -> (shape, dtype)
    the build holds before it runs): the size a build straight into disk blocks asks the model manager
    about before anything is read must count the kept tensors in float32, as the built module holds them."""
    import math

    kept = kept_modules(model)
    return sum(math.prod(shape) * (4 - dtype.itemsize) for name, (shape, dtype) in tensors.items()
               if kept and is_kept(name, kept) and _plain_float(dtype) and dtype.itemsize < 4)


def keep_in_fp32(model: Any, state: Mapping[str, Any],
                 names: Callable[[str], Iterable[str]] = lambda name: (name,)) -> Any:
    """``model`` with the tensors its class keeps in float32 (module docstring) in float32, each read
    again from ``state`` (the file: any of ``names(tensor name)``, with or without ComfyUI's prefix);
    one the file does not hold (or holds in fp8/int8) is widened from what the model holds, a stored
    fp8/int8 tensor is left as it is. Parameters stay parameters (without gradients); tensors on the meta
    device are skipped (a per-block hook: module docstring). Returns ``model``."""
    import torch

    kept = kept_modules(model)
    if not kept:
        return model
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, held in [*module._parameters.items(), *module._buffers.items()]:
            if held is None or held.is_meta or not _plain_float(held.dtype) or held.dtype == torch.float32 \
                    or not is_kept(prefix + attr, kept):
                continue
            found = next((state[p + n] for n in names(prefix + attr) for p in PREFIXES if p + n in state), None)
            source = found if found is not None and _plain_float(found.dtype) else held.detach()
            value = source.to(device=held.device, dtype=torch.float32)
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
    return model
