"""ControlNet nodes with ComfyUI's names, inputs and outputs.

ControlNetLoader / DiffControlNetLoader read ``models/controlnet`` (original,
ComfyUI-repacked and diffusers layouts; see nodes/control/load.py) and return a light
CONTROL_NET handle: the network belongs to the model manager like every model.
ControlNetApplyAdvanced puts the ControlNet on the positive and the negative
conditioning (one shared link, so both passes of guidance are controlled, each with
its own prompt); ControlNetApply (ComfyUI's "OLD" node) on one conditioning, and
ComfyUI lets that control reach the negative too. Applying again on the result
stacks ControlNets: their residuals add up. The control acts while the noise level
is between ``start_percent`` and ``end_percent`` of the model's schedule (ComfyUI's
sigma rule, not diffusers' step fractions). How residuals reach the network is
nodes/control/apply.py. FLUX.1, SD3 and Qwen-Image ControlNets read the hint as latents, so the
apply node needs its ``vae`` input for them (ControlNetApplySD3, ComfyUI's older node for SD3,
requires it); ControlNetInpaintingAliMamaApply gives an inpainting ControlNet (AliMama's SD3 and
FLUX.1 ones, InstantX's Qwen-Image one) the image to repaint and its mask (nodes/control/inpaint.py);
SetUnionControlNetType picks a union ControlNet's control type (FLUX's and SDXL's unions).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.control.apply import ControlLink, ControlNetHandle
from nodes.families.sdxl import UNION_TYPES  # ComfyUI's one combo list for every family's union types
from nodes.loaders import fingerprinter, list_models, locate, model_manager, validator

CONTROLNET_FOLDER = "controlnet"
CONTROL_NET = "CONTROL_NET"


def _controlnets(env: Any) -> list[str]:
    from engine.model_files import marker_for

    return list_models(env, CONTROLNET_FOLDER, marker_for(CONTROLNET_FOLDER))


def _load(path, base: Any, manager) -> Any:
    from nodes.control.load import load_controlnet

    return load_controlnet(path, manager.dtype_rule, base)


def held_controlnet(manager: Any, key: tuple, loader: Callable[[Any], Any], name: str,
                    input_name: str) -> tuple[Any, ControlNetHandle]:
    """(the loaded entry, its CONTROL_NET handle) for a ControlNet-shaped network the model manager
    holds under ``key`` (a ControlNet file, a model patch): loaded once, placed on the compute device
    only while a sampler uses it; a file Kiln cannot load, or running out of memory, is a NodeError
    naming ``input_name``. One rule for every loader whose output is a CONTROL_NET."""
    from nodes.checkpoint.load import CheckpointError

    try:
        loaded = manager.acquire(key, loader)
    except CheckpointError as exc:
        raise NodeError(str(exc), input_name) from None
    except MemoryError:
        raise NodeError(f"not enough memory to load {name}", input_name) from None

    @contextlib.contextmanager
    def use() -> Iterator[Any]:
        with manager.use(key, "", loader) as network:
            yield network

    return loaded, ControlNetHandle(name=name, family=loaded.family, config=dict(loaded.network.config), _use=use)


def _handle(ctx, control_net_name: str, model: Any = None) -> ControlNetHandle:
    from nodes.runtime.models import file_key

    path = locate(ctx.env, CONTROLNET_FOLDER, control_net_name, "control_net_name")
    manager = model_manager(ctx.env)
    base = model.peek() if model is not None else None
    # A diff ControlNet's weights depend on the model they are added to: one entry per base.
    key = file_key(path, "controlnet") + ((id(base),) if base is not None else ())
    loaded, handle = held_controlnet(manager, key, functools.partial(_load, path, base), control_net_name,
                                     "control_net_name")
    ctx.message(f"{control_net_name}: {loaded.family.name} ControlNet ({loaded.info.get('format')}), "
                f"on {manager.device}")
    return handle


@define_node(
    "ControlNetLoader",
    category="loaders",
    display_name="Load ControlNet Model",
    inputs=[Input("control_net_name", T.COMBO, choices=_controlnets,
                  tooltip="A ControlNet in models/controlnet: .safetensors/.pth in the original or diffusers "
                          "layout, or a diffusers folder")],
    outputs=[Output("CONTROL_NET", CONTROL_NET)],
    validate=validator(CONTROLNET_FOLDER, "control_net_name"),
    fingerprint=fingerprinter(CONTROLNET_FOLDER, "control_net_name"),
)
def controlnet_loader(ctx, control_net_name: str):
    """Load a ControlNet once; its family is read from its weights."""
    return (_handle(ctx, control_net_name),)


@define_node(
    "DiffControlNetLoader",
    category="loaders",
    display_name="Load ControlNet Model (diff)",
    inputs=[Input("model", T.MODEL),
            Input("control_net_name", T.COMBO, choices=_controlnets,
                  tooltip="A ControlNet whose weights are stored as differences to a base model")],
    outputs=[Output("CONTROL_NET", CONTROL_NET)],
    validate=validator(CONTROLNET_FOLDER, "control_net_name"),
    fingerprint=fingerprinter(CONTROLNET_FOLDER, "control_net_name"),
)
def diff_controlnet_loader(ctx, model, control_net_name: str):
    """Load a "diff" ControlNet against ``model``'s UNet (its weights, without LoRAs, are added);
    an ordinary ControlNet loads as with ControlNetLoader."""
    if not hasattr(model, "peek"):
        raise NodeError("model must be a MODEL from a loader", "model")
    return (_handle(ctx, control_net_name, model),)


def _hint(image: Any) -> Any:
    import torch

    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise NodeError("image must be an IMAGE [B, H, W, C] with at least 3 channels", "image")
    return image[..., :3].movedim(-1, 1).to(torch.float32).contiguous()


def check_hint_vae(vae: Any, reader: str, family: Any) -> None:
    """Refuse a ``vae`` that cannot encode a latent hint for ``reader`` (a ControlNet or model patch):
    not a loader's VAE, or one making other than ``family``'s latent channels. One rule for every
    control that reads its hint as latents."""
    if not hasattr(vae, "encode"):
        raise NodeError("vae must be a VAE from a loader", "vae")
    channels, wanted = getattr(vae, "latent_channels", None), family.latent.channels
    if channels is not None and channels != wanted:
        raise NodeError(f"{vae.name or 'the vae'} makes {channels}-channel latents; {reader} reads the "
                        f"{family.name} VAE's {wanted}-channel ones: connect the model's VAE", "vae")


def _check(control_net: Any, start: float = 0.0, end: float = 1.0) -> None:
    if not isinstance(control_net, ControlNetHandle):
        raise NodeError(f"control_net must come from a ControlNet loader, got {type(control_net).__name__}",
                        "control_net")
    if start > end:
        raise NodeError(f"start_percent ({start}) is after end_percent ({end})", "start_percent")


def _apply(conditioning: Any, name: str, links: dict, make: Any, **flags: Any) -> list:
    if not isinstance(conditioning, (list, tuple)):
        raise NodeError(f"{name} is not CONDITIONING", name)
    out = []
    for item in conditioning:
        try:
            embeds, extra = item[0], dict(item[1] or {})
        except (TypeError, IndexError, KeyError):
            raise NodeError(f"{name} is not CONDITIONING ([[embeds, {{...}}], ...])", name) from None
        previous = extra.get("control")
        if id(previous) not in links:  # one link per previous chain, shared by both sides
            links[id(previous)] = make(previous)
        extra["control"] = links[id(previous)]
        extra.update(flags)
        out.append([embeds, extra])
    return out


@define_node(
    "ControlNetApplyAdvanced",
    category="conditioning/controlnet",
    display_name="Apply ControlNet",
    inputs=[Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING),
            Input("control_net", CONTROL_NET), Input("image", T.IMAGE,
                                                     tooltip="The hint (e.g. Canny edges), 0..1 RGB"),
            Input("strength", T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
            Input("start_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
            Input("end_percent", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.001),
            Input("vae", T.VAE, optional=True,
                  tooltip="The model's VAE: FLUX and SD3 ControlNets read the hint as latents and need it; "
                          "SD 1.x/2.x/SDXL ones ignore it")],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING)],
)
def controlnet_apply_advanced(ctx, positive, negative, control_net, image, strength: float,
                              start_percent: float, end_percent: float, vae: Any = None):
    """Control both sides of guidance with one ControlNet and hint; strength 0 changes nothing."""
    return _apply_both("ControlNetApplyAdvanced", positive, negative, control_net, image, strength, start_percent,
                       end_percent, vae)


def _apply_both(node: str, positive, negative, control_net, image, strength: float, start_percent: float,
                end_percent: float, vae: Any, mask: Any = None) -> tuple:
    """ControlNetApplyAdvanced's, ControlNetApplySD3's and the AliMama node's work: one link on both
    sides; ``mask`` is an inpainting ControlNet's kept mask (None: keep everything)."""
    _check(control_net, float(start_percent), float(end_percent))
    hint = _hint(image)
    if float(strength) == 0.0:  # ComfyUI returns here too, before it asks for a VAE
        return (positive, negative)
    if control_net.family.controlnet_latent_hint:
        if vae is None:
            raise NodeError(f"{control_net.name} is a {control_net.family.name} ControlNet, which reads its hint as "
                            "latents: connect the model's VAE to the vae input", "vae")
        check_hint_vae(vae, control_net.name, control_net.family)
    latent_vae = vae if control_net.family.controlnet_latent_hint else None
    prompt = _first_prompt(positive) if control_net.family.controlnet_reads_positive_prompt(control_net.config) \
        else None

    def make(previous: Any) -> ControlLink:
        return ControlLink(control_net, hint, float(strength), float(start_percent), float(end_percent),
                           previous, node, vae=latent_vae, mask=mask, prompt=prompt)

    links: dict = {}
    return (_apply(positive, "positive", links, make, control_apply_to_uncond=False),
            _apply(negative, "negative", links, make, control_apply_to_uncond=False))


def _first_prompt(positive: Any) -> tuple | None:
    """(embeds, extra) of the positive's first entry: what a ControlNet reading the positive prompt on
    both sides of guidance reads (several positive entries: the first, as a pipeline has one prompt)."""
    if isinstance(positive, (list, tuple)) and not positive:
        return None  # nothing to read; the rows then read their own prompts
    try:
        embeds, extra = positive[0][0], dict(positive[0][1] or {})
    except (TypeError, IndexError, KeyError):
        raise NodeError("positive is not CONDITIONING ([[embeds, {...}], ...])", "positive") from None
    return embeds, {k: v for k, v in extra.items() if k != "control"}


@define_node(
    "ControlNetApplySD3",
    category="conditioning/controlnet",
    display_name="Apply Controlnet with VAE",
    inputs=[Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING),
            Input("control_net", CONTROL_NET), Input("vae", T.VAE, tooltip="The model's VAE, which encodes the hint"),
            Input("image", T.IMAGE, tooltip="The hint (e.g. Canny edges), 0..1 RGB"),
            Input("strength", T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
            Input("start_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
            Input("end_percent", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.001)],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING)],
)
def controlnet_apply_sd3(ctx, positive, negative, control_net, vae, image, strength: float,
                         start_percent: float, end_percent: float):
    """ComfyUI's (now deprecated) node from the SD3 release: ControlNetApplyAdvanced with the vae
    required, kept so workflows of that time run unchanged."""
    return _apply_both("ControlNetApplySD3", positive, negative, control_net, image, strength, start_percent,
                       end_percent, vae)


@define_node(
    "ControlNetInpaintingAliMamaApply",
    category="conditioning/controlnet",
    display_name="ControlNetInpaintingAliMamaApply",
    inputs=[Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING),
            Input("control_net", CONTROL_NET), Input("vae", T.VAE, tooltip="The model's VAE, which encodes the image"),
            Input("image", T.IMAGE, tooltip="The image to inpaint, 0..1 RGB"),
            Input("mask", T.MASK, tooltip="What to repaint (1) and what to keep (0)"),
            Input("strength", T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
            Input("start_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
            Input("end_percent", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.001)],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING)],
)
def controlnet_inpainting_alimama_apply(ctx, positive, negative, control_net, vae, image, mask, strength: float,
                                        start_percent: float, end_percent: float):
    """Apply an inpainting ControlNet (AliMama's SD3 and FLUX.1 ones): its hint is the image with the
    masked area blacked out, VAE-encoded, and the mask (nodes/control/inpaint.py). Any other ControlNet
    is applied as by ControlNetApplyAdvanced with the image as its hint, as ComfyUI does."""
    from nodes.control.inpaint import extra_channels, masked_image
    from nodes.masking import as_mask

    if mask is None:
        raise NodeError("connect a MASK (1 where the image is repainted) to the mask input", "mask")
    mask = as_mask(mask, "mask")
    _check(control_net, float(start_percent), float(end_percent))
    kept = None
    if extra_channels(control_net.config):
        image, kept = masked_image(_hint(image).movedim(1, -1), mask)
    return _apply_both("ControlNetInpaintingAliMamaApply", positive, negative, control_net, image, strength,
                       start_percent, end_percent, vae, mask=kept)


@define_node(
    "ControlNetApply",
    category="conditioning/controlnet",
    display_name="Apply ControlNet (OLD)",
    inputs=[Input("conditioning", T.CONDITIONING), Input("control_net", CONTROL_NET), Input("image", T.IMAGE),
            Input("strength", T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.01)],
    outputs=[Output("CONDITIONING", T.CONDITIONING)],
)
def controlnet_apply(ctx, conditioning, control_net, image, strength: float):
    """ComfyUI's older node: one conditioning, the whole schedule; the negative side of
    guidance borrows this control when it has none (ComfyUI's ``control_apply_to_uncond``)."""
    _check(control_net)
    hint = _hint(image)
    if float(strength) == 0.0:
        return (conditioning,)
    if control_net.family.controlnet_latent_hint:
        raise NodeError(f"{control_net.name} is a {control_net.family.name} ControlNet, which needs a VAE for its "
                        "hint: use Apply ControlNet (ControlNetApplyAdvanced) with its vae input", "control_net")

    def make(previous: Any) -> ControlLink:
        return ControlLink(control_net, hint, float(strength), 0.0, 1.0, previous, "ControlNetApply")

    return (_apply(conditioning, "conditioning", {}, make, control_apply_to_uncond=True),)


def _union_modes(config: dict) -> int | None:
    """How many control types a ControlNet's config says it knows (None: not a union):
    FLUX's ``num_mode``, SDXL union's ``num_control_type``."""
    from nodes.control.sdxl_union import modes

    return int(config["num_mode"]) if config.get("num_mode") else modes(config)


@define_node(
    "SetUnionControlNetType",
    category="conditioning/controlnet",
    display_name="SetUnionControlNetType",
    inputs=[Input("control_net", CONTROL_NET),
            Input("type", T.COMBO, choices=("auto",) + UNION_TYPES,
                  tooltip="What the hint is; auto runs a union ControlNet without a type")],
    outputs=[Output("CONTROL_NET", CONTROL_NET)],
)
def set_union_controlnet_type(ctx, control_net, type: str):
    """Tell a union ControlNet (one network for several hint kinds) which kind it is given; the
    names and their indices are the ControlNet's family's (``Family.controlnet_union_types``).
    A ControlNet that is not a union ignores the type, as in ComfyUI, and the node says so."""
    _check(control_net)
    names = control_net.family.controlnet_union_types
    modes = _union_modes(control_net.config)
    if type != "auto" and type not in UNION_TYPES:
        raise NodeError(f"type must be auto or one of {', '.join(UNION_TYPES)}", "type")
    if not modes:
        if type != "auto":
            ctx.message(f"control_net: {control_net.name} is not a union ControlNet; the type {type} is ignored")
        return (control_net,)
    if type != "auto" and type not in names:
        raise NodeError(f"{control_net.name} is a {control_net.family.name} union ControlNet, whose types are "
                        f"{', '.join(names)}", "type")
    mode = None if type == "auto" else names.index(type)
    if mode is not None and mode >= modes:
        raise NodeError(f"{control_net.name} knows {modes} control types; {type} is number {mode}"
                        + (" (ProMax adds tile and repaint)" if modes == 6 else ""), "type")
    return (dataclasses.replace(control_net, mode=mode),)
