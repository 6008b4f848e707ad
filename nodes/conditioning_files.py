"""SaveConditioning and ConditioningLoader: a CONDITIONING as a safetensors file (ComfyUI's format).

A file holds one entry: its embeds under the tensor ``conditioning``; every other tensor
is an option of the entry, except tensors named ``<name>.<int>``, which are the items of a
list option ``<name>`` in index order (reference latents); the plain options (bool, int,
float, str, null) are a JSON object under the metadata key ``conditioning_options``.
Marigold v2's templates load their precomputed prompt embedding this way, from ComfyUI's
``models/embeddings`` folder (listed as every model folder is: engine.model_files).

Option names in a file are ComfyUI's. Kiln's CONDITIONING uses ComfyUI's names for most
options and its own for a few: :data:`COMFY_TO_KILN` is the one table between them, read
both ways. An option outside it is refused by name on loading (Kiln would not use it, and
dropping it silently would sample something else than the file means) and on saving (the
file would not load again). Saving resolves its prefix and numbers its files as SaveImage
and SaveLatent do (``prefix_00001_.safetensors``).
"""
from __future__ import annotations

import json
import re
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.model_files import marker_for
from engine.node import Input, Output, Result, define_node
from nodes import image as _image_nodes
from nodes import image_io as io_
from nodes.families import flux_references
from nodes.families.qwen_image import MASK as QWEN_TEXT_MASK
from nodes.loaders import fingerprinter, list_models, locate, validator

#: ComfyUI's model folder of prompt embeddings (textual inversion; ConditioningLoader's files).
EMBEDDINGS_FOLDER = "embeddings"
EMBEDS = "conditioning"
OPTIONS_KEY = "conditioning_options"
EXTENSION = ".safetensors"
#: ComfyUI's option name -> Kiln's, for every option a file may carry (same name: same meaning).
COMFY_TO_KILN: dict[str, str] = {
    "attention_mask": QWEN_TEXT_MASK,  # the prompt tokens attended to (Qwen-Image's and Krea 2's text mask)
    "reference_latents": flux_references.LATENTS,
    "reference_latents_method": flux_references.METHOD,
    **{name: name for name in (
        "pooled_output", "guidance", "strength", "start_percent", "end_percent", "mask", "set_area_to_bounds",
        "mask_strength", "width", "height", "crop_w", "crop_h", "target_width", "target_height", "aesthetic_score")},
}
KILN_TO_COMFY = {kiln: comfy for comfy, kiln in COMFY_TO_KILN.items()}
PLAIN = (bool, int, float, str, type(None))
_ITEM = re.compile(r"^(.+)\.(\d+)$")


def _embeddings(env: Any) -> list[str]:
    return list_models(env, EMBEDDINGS_FOLDER, marker_for(EMBEDDINGS_FOLDER))


def _file_options(tensors: dict, plain: dict, name: str) -> dict[str, Any]:
    """Kiln's options from a file's tensors (``conditioning`` taken out) and plain options."""
    found: dict[str, Any] = dict(plain)
    items: dict[str, list[tuple[int, Any]]] = {}
    for key, value in tensors.items():
        value = value.float() if value.is_floating_point() else value  # Kiln's conditionings are float32
        m = _ITEM.match(key)
        if m:
            items.setdefault(m.group(1), []).append((int(m.group(2)), value))
        else:
            found[key] = value
    for key, listed in items.items():
        found[key] = [v for _, v in sorted(listed, key=lambda kv: kv[0])]
    out = {}
    for key, value in found.items():
        if key not in COMFY_TO_KILN:
            raise NodeError(f"'{name}' carries the option {key!r}, which Kiln's conditioning does not use (it "
                            f"reads {', '.join(sorted(COMFY_TO_KILN))})", "conditioning_name")
        out[COMFY_TO_KILN[key]] = value
    return out


@define_node(
    "ConditioningLoader",
    category="model/loaders",
    display_name="Load Conditioning",
    inputs=[Input("conditioning_name", T.COMBO, choices=_embeddings,
                  tooltip="A conditioning saved by SaveConditioning, in models/embeddings")],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
    validate=validator(EMBEDDINGS_FOLDER, "conditioning_name"),
    fingerprint=fingerprinter(EMBEDDINGS_FOLDER, "conditioning_name"),
)
def conditioning_loader(ctx, conditioning_name: str):
    """Load a saved conditioning (one entry: the embeds and their options, names mapped to Kiln's)."""
    from safetensors import SafetensorError, safe_open

    path = locate(ctx.env, EMBEDDINGS_FOLDER, conditioning_name, "conditioning_name")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise NodeError(f"'{conditioning_name}' is not a readable safetensors file: {exc}",
                        "conditioning_name") from None
    if EMBEDS not in tensors:
        found = ", ".join(sorted(tensors)) or "none"
        raise NodeError(f"'{conditioning_name}' has no '{EMBEDS}' tensor (its tensors: {found}); it is not a "
                        "conditioning as SaveConditioning writes them", "conditioning_name")
    try:
        plain = json.loads(metadata.get(OPTIONS_KEY) or "{}")
    except json.JSONDecodeError as exc:
        raise NodeError(f"'{conditioning_name}': its '{OPTIONS_KEY}' metadata is not JSON ({exc})",
                        "conditioning_name") from None
    if not isinstance(plain, dict):
        raise NodeError(f"'{conditioning_name}': its '{OPTIONS_KEY}' metadata is not a JSON object",
                        "conditioning_name")
    embeds = tensors.pop(EMBEDS).float()
    if embeds.ndim == 2:
        embeds = embeds[None]
    if embeds.ndim != 3:
        raise NodeError(f"'{conditioning_name}': its '{EMBEDS}' tensor has shape {tuple(embeds.shape)}, not "
                        "[1, tokens, width]", "conditioning_name")
    return ([[embeds, _file_options(tensors, plain, conditioning_name)]],)


def _to_file(conditioning: Any) -> tuple[dict, dict]:
    """(tensors, plain options) of a one-entry CONDITIONING, option names as ComfyUI's."""
    import torch

    from nodes.conditioning_nodes import _entries

    entries = _entries(conditioning, "conditioning")
    if len(entries) != 1:
        raise NodeError(f"the conditioning has {len(entries)} entries; a file holds one: save it before "
                        "combining", "conditioning")
    embeds, extra = entries[0]
    tensors = {EMBEDS: embeds.detach().to("cpu").contiguous()}
    plain: dict[str, Any] = {}
    for key, value in extra.items():
        if key not in KILN_TO_COMFY:
            raise NodeError(f"option {key!r} has no place in a conditioning file (ComfyUI's options Kiln reads: "
                            f"{', '.join(sorted(COMFY_TO_KILN))})", "conditioning")
        name = KILN_TO_COMFY[key]
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu").contiguous()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            tensors.update({f"{name}.{i}": v.detach().to("cpu").contiguous() for i, v in enumerate(value)})
        elif isinstance(value, PLAIN):
            plain[name] = value
        else:
            raise NodeError(f"option {key!r} is a {type(value).__name__}: a conditioning file holds tensors, "
                            "lists of tensors and plain values (bool, int, float, str)", "conditioning")
    return tensors, plain


@define_node(
    "SaveConditioning",
    category="model/conditioning",
    output_node=True,
    inputs=[Input("conditioning", T.CONDITIONING),
            _image_nodes.prefix_input("conditioning/Kiln", "conditioning/ComfyUI")],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
    validate=_image_nodes.save_validate,
)
def save_conditioning(ctx, conditioning, filename_prefix: str = "conditioning/Kiln"):
    """Save a one-entry conditioning as ``prefix_00001_.safetensors`` in the output folder (ComfyUI's
    format; put it in models/embeddings to load it with ConditioningLoader), and pass it on."""
    from safetensors.torch import save

    tensors, plain = _to_file(conditioning)
    folder, subfolder, base = _image_nodes.save_folder(ctx.env, ctx.env.paths.output, filename_prefix, "output")
    metadata = {**_image_nodes.metadata_strings(ctx), OPTIONS_KEY: json.dumps(plain)}
    data = save(tensors, metadata=metadata)
    name = io_.write_numbered_atomic(folder, base, EXTENSION, lambda f: f.write(data))
    return Result(outputs=(conditioning,),
                  ui={"conditioning": [{"filename": name, "subfolder": subfolder, "type": "output"}]})
