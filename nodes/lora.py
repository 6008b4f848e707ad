"""LoraLoader and LoraLoaderModelOnly: ComfyUI's names and inputs, reading ``models/loras/``.

A LoRA adds an entry to the handle's stack (nodes.handles); the weights are
patched only while the network is in use and restored exactly afterwards
(nodes.runtime.patches), so the base handle, every cached result holding it and
every other LoRA combination keep using one copy of the model. Chaining loaders
stacks LoRAs. The formats read are listed in nodes.lora_keys.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle, ModelHandle
from nodes.loaders import fingerprinter, list_models, locate, validator

LORA_FOLDER = "loras"
#: ComfyUI's range: negative strengths invert a LoRA, which people use.
MAX_STRENGTH = 100.0


def _loras(env: Any) -> list[str]:
    return list_models(env, LORA_FOLDER, None)


def _strength(name: str, tip: str) -> Input:
    return Input(name, T.FLOAT, default=1.0, min=-MAX_STRENGTH, max=MAX_STRENGTH, step=0.01, tooltip=tip)


def _read(path: Path) -> dict[str, Any]:
    from nodes.checkpoint.load import CheckpointError, read_state_dict

    try:
        return read_state_dict(path)
    except CheckpointError as exc:
        raise NodeError(str(exc), "lora_name") from None


def _targets(model: ModelHandle | None, clip: ClipHandle | None, keys: Any) -> dict[str, Any]:
    """target name -> network (on whatever device it is; only names and shapes are read). A text encoder
    part left to build on first use (a Qwen-VL's vision tower) is built when the LoRA's ``keys`` name it, so
    its modules are patched rather than reported unmatched."""
    from nodes.runtime.deferred import pending

    networks = {}
    if model is not None:
        networks["unet"] = model.peek()
    if clip is not None:
        for spec in clip.family.text_encoders:
            encoder = clip.peek(spec.module)
            if any(part in key for part in pending(encoder) for key in keys):
                encoder = clip.peek_whole(spec.module)
            networks[spec.module] = encoder
    return networks


def apply_lora(ctx: Any, lora_name: str, model: ModelHandle | None, clip: ClipHandle | None,
               strength_model: float, strength_clip: float) -> tuple[ModelHandle | None, ClipHandle | None]:
    """The handles with the LoRA added to their stacks; errors and a message name what matched."""
    from nodes import lora_keys
    from nodes.runtime import lycoris
    from nodes.runtime.dora import Dora
    from nodes.runtime.patches import Diff, LoraEntry

    path = locate(ctx.env, LORA_FOLDER, lora_name, "lora_name")
    state = _read(path)
    networks = _targets(model, clip, state.keys())
    kind = (model or clip).family
    lookups = {t: lora_keys.module_names(n, t, dict(n.config), kind.lora_modules(n)) if t == "unet" else
               lora_keys.module_names(n, t) for t, n in networks.items()}
    shapes = {t: {k: tuple(p.shape) for k, p in n.named_parameters()} for t, n in networks.items()}
    found = lora_keys.match(state, lookups, shapes, lora_keys.encoder_prefixes(clip.family) if clip else ())
    family = kind.name
    made_for = lora_keys.made_for(state)
    guess = f"it looks like a {made_for} LoRA" if made_for and not family.startswith(made_for.lower()) else \
        "was it made for another model family?"
    if found.mismatched:
        raise NodeError(f"{lora_name} does not fit this {family} model: {len(found.mismatched)} of its modules have "
                        f"other shapes (e.g. {found.mismatched[0]}); {guess}",
                        "lora_name")
    if found.refused:
        raise NodeError(f"{lora_name}: DoRA module {found.refused[0]}; leave this LoRA out", "lora_name")
    skipped = [k for k in found.unmatched if clip is None and k.startswith(("lora_te", "text_encoder"))]
    unmatched = [k for k in found.unmatched if k not in skipped]
    if found.count == 0:
        raise NodeError(f"no module of {lora_name} matched this {family} model (0 of {len(found.unmatched)} "
                        f"LoRA modules, e.g. {found.unmatched[:3]}); {guess}",
                        "lora_name")
    # text-encoder modules may fit (FLUX and SD 1.x share CLIP-L) while the network part fits nothing
    unet_keys = lora_keys.network_keys(found.unmatched)
    if model is not None and unet_keys and not found.tables.get("unet"):
        raise NodeError(f"{lora_name}'s diffusion-model part ({len(unet_keys)} modules, e.g. {unet_keys[:2]}) matches "
                        f"nothing in this {family} model; {guess}", "lora_name")
    parts = ", ".join(f"{len(t)} in {name}" for name, t in sorted(found.tables.items()))
    note = f"{lora_name}: {found.count} modules patched ({parts})"
    whole = sum(isinstance(p, Diff) for t in found.tables.values() for p in t.values())
    if whole:
        note += f"; {whole} of them by whole weight or bias differences"
    inner = [p.inner if isinstance(p, Dora) else p for t in found.tables.values() for p in t.values()]
    products = [p.kind for p in inner if isinstance(p, lycoris.Product)]
    if products:
        note += f"; {len(products)} by LyCORIS " + " and ".join(
            f"{k} ({products.count(k.lower())})" for k in ("LoHa", "LoKr") if k.lower() in products)
    doras = sum(isinstance(p, Dora) for t in found.tables.values() for p in t.values())
    if doras:
        note += f"; {doras} with DoRA weight decomposition"
    if skipped:
        note += f"; {len(skipped)} text-encoder modules ignored (no CLIP input)"
    if unmatched:
        note += f"; {len(unmatched)} not matched, e.g. {unmatched[:3]}"
    ctx.message(note)
    if model is not None:
        entry = LoraEntry(lora_name, float(strength_model), {"unet": found.tables.get("unet", {})})
        model = dataclasses.replace(model, loras=(*model.loras, entry))
    if clip is not None:
        tables = {t: v for t, v in found.tables.items() if t != "unet"}
        clip = dataclasses.replace(clip, loras=(*clip.loras, LoraEntry(lora_name, float(strength_clip), tables)))
    return model, clip


def _check(model: Any, clip: Any = None, need_clip: bool = False) -> None:
    if not isinstance(model, ModelHandle):
        raise NodeError(f"model must come from a model loader, got {type(model).__name__}", "model")
    if need_clip and not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a checkpoint or CLIP loader, got {type(clip).__name__}", "clip")


@define_node(
    "LoraLoader",
    category="loaders",
    display_name="Load LoRA",
    inputs=[
        Input("model", T.MODEL),
        Input("clip", T.CLIP),
        Input("lora_name", T.COMBO, choices=_loras, tooltip="A LoRA file in models/loras (kohya/A1111, "
              "diffusers/PEFT, LoCon, or LyCORIS LoHa/LoKr format, DoRA included)."),
        _strength("strength_model", "How strongly the LoRA changes the diffusion model; 0 = not at all, "
                  "negative inverts it."),
        _strength("strength_clip", "How strongly the LoRA changes the text encoder(s)."),
    ],
    outputs=[Output("MODEL", T.MODEL), Output("CLIP", T.CLIP)],
    validate=validator(LORA_FOLDER, "lora_name"),
    fingerprint=fingerprinter(LORA_FOLDER, "lora_name"),
)
def lora_loader(ctx, model, clip, lora_name: str, strength_model: float = 1.0, strength_clip: float = 1.0):
    """Add a LoRA to the model and its text encoders; chain loaders to stack several."""
    _check(model, clip, need_clip=True)
    return apply_lora(ctx, lora_name, model, clip, strength_model, strength_clip)


@define_node(
    "LoraLoaderModelOnly",
    category="loaders",
    display_name="Load LoRA (model only)",
    inputs=[
        Input("model", T.MODEL),
        Input("lora_name", T.COMBO, choices=_loras, tooltip="A LoRA file in models/loras."),
        _strength("strength_model", "How strongly the LoRA changes the diffusion model."),
    ],
    outputs=[Output("MODEL", T.MODEL)],
    validate=validator(LORA_FOLDER, "lora_name"),
    fingerprint=fingerprinter(LORA_FOLDER, "lora_name"),
)
def lora_loader_model_only(ctx, model, lora_name: str, strength_model: float = 1.0):
    """Add a LoRA to the diffusion model only (its text-encoder part, if any, is ignored)."""
    _check(model)
    return (apply_lora(ctx, lora_name, model, None, strength_model, 0.0)[0],)
