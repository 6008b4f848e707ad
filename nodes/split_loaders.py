"""UNETLoader, CLIPLoader and DualCLIPLoader: models stored as separate files, ComfyUI's way.

Folders are ComfyUI's, old names included: ``models/diffusion_models`` (or
``models/unet``) and ``models/text_encoders`` (or ``models/clip``). The loading
rules are in nodes.checkpoint.split; the handles and the model manager are the
same as CheckpointLoader's, so a UNet from one file and text encoders from others
sample, take LoRAs and cache exactly like a checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle, ModelHandle
from nodes.loaders import (_acquire, dtype_note, fingerprinter, held_note, list_models, locate, model_manager,
                           peek_module, use_head, validator, widened)
from nodes.runtime.models import ModelManager, file_key

UNET_FOLDERS = ("diffusion_models", "unet")
TEXT_FOLDERS = ("text_encoders", "clip")
#: ComfyUI's weight_dtype choices; weights are kept in the compute dtype (fp8 storage is not done yet).
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


def _families_types(count: int) -> list[str]:
    from nodes import families

    return sorted({t for f in families.ALL for t in f.clip_types if len(f.text_encoders) == count
                   or (getattr(f, "partial_text", False) and count < len(f.text_encoders))})


def _clip_loader_types() -> list[str]:
    """The single-encoder families' types, and the ComfyUI types under which the file alone decides
    (nodes.checkpoint.split.BY_FILE_TYPES)."""
    from nodes.checkpoint.split import BY_FILE_TYPES

    return sorted(set(_families_types(1)) | set(BY_FILE_TYPES))


def _unets(env: Any) -> list[str]:
    return list_models(env, UNET_FOLDERS, None)


def _texts(env: Any) -> list[str]:
    return list_models(env, TEXT_FOLDERS, None)


def _load_unet(path: Path, manager: ModelManager, fp8: str = "") -> Any:
    from nodes.checkpoint.split import load_unet_file

    return widened(load_unet_file(path, manager.dtype_rule, fp8=fp8, offload=manager.plan_for_load), manager)


@define_node(
    "UNETLoader",
    category="loaders",
    display_name="Load Diffusion Model",
    inputs=[
        Input("unet_name", T.COMBO, choices=_unets,
              tooltip="A diffusion model (UNet) file in models/diffusion_models or models/unet, in the original "
                      "or diffusers layout."),
        Input("weight_dtype", T.COMBO, default="default", choices=WEIGHT_DTYPES, optional=True,
              tooltip="fp8_*: store a FLUX or SD3 transformer's linear weights in 8-bit floats (half the memory of "
                      "bf16), each layer cast to the compute dtype while it runs; fp8 files stay fp8 anyway. SD "
                      "UNets keep the compute dtype (fp16 on a GPU, fp32 on the CPU)."),
    ],
    outputs=[Output("MODEL", T.MODEL)],
    validate=validator(UNET_FOLDERS, "unet_name"),
    fingerprint=fingerprinter(UNET_FOLDERS, "unet_name"),
)
def unet_loader(ctx, unet_name: str, weight_dtype: str = "default"):
    """Load a diffusion model on its own; its family comes from its shapes."""
    path = locate(ctx.env, UNET_FOLDERS, unet_name, "unet_name")
    manager = model_manager(ctx.env)
    fp8 = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e4m3fn_fast": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}.get(
        weight_dtype, "")
    key = file_key(path, "unet" + (f"-{fp8}" if fp8 else ""))
    loader = functools.partial(_load_unet, path, fp8=fp8)
    loaded = _acquire(manager, key, loader, "unet_name", unet_name)
    if fp8 and not loaded.info.get("fp8"):
        ctx.message(f"weight_dtype {weight_dtype} is applied to FLUX and SD3 transformers only: this "
                    f"{loaded.family.name} UNet's weights stay in the compute dtype")
    ctx.message(f"{unet_name}: {loaded.family.name} UNet, {loaded.info['prediction_type']} "
                f"({loaded.info['prediction_reason']}), on {manager.device}{dtype_note(loaded)}"
                f"{held_note(loaded.info)}{manager.precision_note(loaded.family)}")
    return (ModelHandle(family=loaded.family, scheduler_config=dict(loaded.scheduler_config), latent=loaded.latent,
                        _use_unet=lambda: manager.use(key, "unet", loader), name=unet_name, extra=dict(loaded.info),
                        _peek=lambda: peek_module(manager, key, loader, "unet")),)


def _load_texts(paths: list[Path], clip_type: str, manager: ModelManager) -> Any:
    from nodes.checkpoint.split import TextFile, family_for_texts, load_text_files

    files = [TextFile.read(p) for p in paths]
    return load_text_files(files, family_for_texts(clip_type, files), manager.dtype_rule)


def _clip(ctx, names: list[tuple[str, str]], clip_type: str) -> ClipHandle:
    """A ClipHandle over the encoder files ``names`` ((input name, file name) pairs)."""
    from nodes.checkpoint.load import CheckpointError

    paths = [locate(ctx.env, TEXT_FOLDERS, name, input_name) for input_name, name in names]
    manager = model_manager(ctx.env)
    key = ("text_encoders", clip_type, *(part for p in paths for part in file_key(p)))
    loader = functools.partial(_load_texts, paths, clip_type)
    input_name = names[0][0]
    try:
        loaded = _acquire(manager, key, loader, input_name, names[0][1])
    except NodeError as exc:
        # name the input whose file is at fault when the message says which
        culprit = next((i for i, n in names if n in str(exc)), input_name)
        raise NodeError(str(exc), culprit) from None
    except CheckpointError as exc:  # pragma: no cover - _acquire converts these
        raise NodeError(str(exc), input_name) from None
    ctx.message(f"{' + '.join(n for _, n in names)}: {loaded.family.name} text encoders, on {manager.device}")
    return ClipHandle(family=loaded.family, tokenizers=loaded.tokenizers,
                      _use=lambda which, parts=(): manager.use(key, which, loader, parts),
                      name="+".join(n for _, n in names),
                      _peek=functools.partial(peek_module, manager, key, loader),
                      _use_head=functools.partial(_use_head, manager, key, paths, loaded.family))


def _use_head(manager: ModelManager, key: tuple, paths: list[Path], family: Any,
              module: str) -> contextlib.AbstractContextManager:
    """Encoder ``module``'s output head from its file (nodes.loaders.use_head); None when the file has none."""
    from nodes.checkpoint.lm_head import build_head, file_with_head

    kind = next(spec.kind for spec in family.text_encoders if spec.module == module)
    path = file_with_head(paths, kind)
    return use_head(manager, key, module, family, None if path is None else functools.partial(build_head, path))


@define_node(
    "CLIPLoader",
    category="loaders",
    display_name="Load CLIP",
    inputs=[
        Input("clip_name", T.COMBO, choices=_texts,
              tooltip="A text encoder file in models/text_encoders or models/clip (transformers or OpenCLIP "
                      "layout)."),
        Input("type", T.COMBO, default="stable_diffusion", choices=lambda env: _clip_loader_types(),
              tooltip="Which model the encoder is for: stable_diffusion is SD 1.x (CLIP-L) or SD 2.x "
                      "(OpenCLIP ViT-H), told apart by the file."),
        Input("device", T.COMBO, default="default", choices=["default", "cpu"], optional=True),
    ],
    outputs=[Output("CLIP", T.CLIP)],
    validate=validator(TEXT_FOLDERS, "clip_name"),
    fingerprint=fingerprinter(TEXT_FOLDERS, "clip_name"),
)
def clip_loader(ctx, clip_name: str, type: str = "stable_diffusion", device: str = "default"):  # noqa: A002
    """Load one text encoder for a family with a single encoder."""
    return (_clip(ctx, [("clip_name", clip_name)], type),)


def texts_validator(names: tuple[str, ...]) -> Any:
    """A loader's validation over several text-encoder file inputs (DualCLIPLoader's, Triple..., Quadruple...)."""
    return lambda env, inputs: [e for name in names for e in validator(TEXT_FOLDERS, name)(env, inputs)]


def texts_fingerprint(names: tuple[str, ...]) -> Any:
    """A loader's fingerprint over several text-encoder file inputs."""
    return lambda env, inputs: [fingerprinter(TEXT_FOLDERS, n)(env, inputs) for n in names]


@define_node(
    "DualCLIPLoader",
    category="loaders",
    display_name="Load Dual CLIP",
    inputs=[
        Input("clip_name1", T.COMBO, choices=_texts),
        Input("clip_name2", T.COMBO, choices=_texts),
        Input("type", T.COMBO, default="sdxl", choices=lambda env: _families_types(2),
              tooltip="sdxl: CLIP-L and OpenCLIP bigG, in either order."),
        Input("device", T.COMBO, default="default", choices=["default", "cpu"], optional=True),
    ],
    outputs=[Output("CLIP", T.CLIP)],
    validate=texts_validator(("clip_name1", "clip_name2")),
    fingerprint=texts_fingerprint(("clip_name1", "clip_name2")),
)
def dual_clip_loader(ctx, clip_name1: str, clip_name2: str, type: str = "sdxl",  # noqa: A002
                     device: str = "default"):
    """Load a two-encoder family's text encoders (SDXL's clip_l + clip_g) from two files."""
    return (_clip(ctx, [("clip_name1", clip_name1), ("clip_name2", clip_name2)], type),)
