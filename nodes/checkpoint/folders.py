"""Components of diffusers pipeline folders (unet/, transformer/, vae/, text_encoder/...) read tensor by
tensor into modules built empty from their configs, one .safetensors file or shards, so a folder loads
with one weight set held, as single files do (nodes.checkpoint.tensors); ``from_pretrained`` maps the
whole file and casts afterwards, the file plus the cast copy at the peak."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import CheckpointError, _assign, _empty, _text_state, open_state, reading
from nodes.checkpoint.tensors import cast_view


#: The stems of a diffusers / transformers component's weights: ``<stem>.safetensors``, shards listed by
#: ``<stem>.safetensors.index.json``, and the variants ``save_pretrained(variant="fp16")`` writes
#: (``<stem>.fp16.safetensors``, ``<stem>.safetensors.index.fp16.json``), which many hub downloads hold alone.
FOLDER_STEMS = ("diffusion_pytorch_model", "model")
#: The variant that holds the very values a load in this compute dtype would cast to.
_VARIANT_OF = {"float16": "fp16", "bfloat16": "bf16"}


def _weights_files(folder: Path, dtype: Any) -> list[tuple[Path, str]]:
    """(weights file or shard index, its variant or "") in the folder, best first: the variant in the
    compute dtype (the same values the full file gives, cast, at half the reading), the full file, then
    any other variant."""
    found: list[tuple[Path, str]] = []
    for stem in FOLDER_STEMS:
        for path in (folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"):
            if path.is_file():
                found.append((path, ""))
        for path in sorted(folder.glob(f"{stem}.*.safetensors")) + sorted(folder.glob(f"{stem}.safetensors.index.*.json")):
            variant = path.name.split(".")[-2]
            if "-of-" not in variant:  # a shard of a variant, read through its index
                found.append((path, variant))
    wanted = _VARIANT_OF.get(str(dtype).replace("torch.", ""), "")
    return sorted(found, key=lambda f: (f[1] != wanted, f[1] != "") if wanted else f[1] != "")


def folder_state(folder: Path, dtype: Any = None) -> tuple[Path, Mapping[str, Any], str] | None:
    """A component folder's weights file (or shard index), its tensors, each read when asked for, and its
    variant ("" for none; :func:`_weights_files` chooses for the compute ``dtype``); None for .bin and
    other layouts, which ``from_pretrained`` reads."""
    from nodes.checkpoint.tensors import ShardedState

    files = _weights_files(folder, dtype) if (folder / "config.json").is_file() else []
    if not files:
        return None
    path, variant = files[0]
    return path, ShardedState.open_index(path) if path.name.endswith(".json") else open_state(path), variant


def folder_component(folder: Path, cls: Any, dtype: Any, offload: Any = None, besides: int = 0,
                     as_stored: bool = False, ready: Any = None) -> Any:
    """One component of a diffusers pipeline folder (unet/, vae/, text_encoder/...), computing in ``dtype``.

    Its .safetensors file (or shards) is read tensor by tensor into a module built empty from its
    config, each tensor cast as it is read (``from_pretrained`` maps the whole file and casts
    afterwards: the file plus the cast copy at the peak). ``as_stored``: linear weights are held as
    stored (nodes.runtime.fp8.keep_linears_as_stored), as the split-file loaders hold FLUX's and
    T5's. ``offload``/``besides``: a denoiser's question to the model manager, asked with the header's
    size and the bytes of the load's other modules, whose "disk" answer builds it straight into disk
    blocks (nodes.checkpoint.paged.own_layout_straight) from the same opened files and empty module.
    .bin files, and keys that do not fit strictly when built whole, go through ``from_pretrained``.
    ``ready``: what the family's loader does to the built denoiser last, given to the straight build to
    run before each block is written (nodes.checkpoint.paged.build_paged); a whole build leaves it to the
    caller.
    """
    found = folder_state(folder, dtype)
    if found is not None:
        weights, state, _ = found
        with reading(weights):
            module = _empty_component(folder, cls)
            if offload is not None:
                from nodes.checkpoint.paged import own_layout_straight

                paged = own_layout_straight(module, state, dtype, offload, f"{folder.parent.name}/{folder.name}",
                                            besides, as_stored, ready)
                if paged is not None:
                    return paged
            try:
                return _fill(module, state, dtype, as_stored)
            except (CheckpointError, TypeError):
                pass  # e.g. renamed legacy keys: diffusers' own loader knows them
    variant = {"variant": found[2]} if found is not None and found[2] else {}
    module = cls.from_pretrained(str(folder), local_files_only=True, **variant)
    if module.dtype != dtype:  # .to() on diffusers models logs a warning even when it changes nothing
        module.to(dtype)
    return module


def _empty_component(folder: Path, cls: Any) -> Any:
    """A module of a diffusers or transformers class, built empty from the folder's config."""
    if hasattr(cls, "load_config"):  # a diffusers model
        init, _, _ = cls.extract_init_dict(cls.load_config(str(folder)))
        return _empty(cls, dict(init))
    return _empty(cls, cls.config_class.from_pretrained(str(folder)))


def _fill(module: Any, state: Mapping[str, Any], dtype: Any, as_stored: bool) -> Any:
    """``module`` assigned strictly from ``state``, so a key that does not fit raises (and the caller falls
    back to ``from_pretrained``)."""
    if as_stored:
        from nodes.runtime.fp8 import keep_linears_as_stored

        state = keep_linears_as_stored(module, dict(state), dtype)
    else:
        state = cast_view(state, dtype)
    if not hasattr(module, "load_config"):  # a transformers model: its key style and depth
        state = _text_state(state, module)
    return _assign(module, state, type(module).__name__, None if as_stored else dtype)
