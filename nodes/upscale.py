"""UpscaleModelLoader and ImageUpscaleWithModel: super-resolution networks through spandrel.

Models live in ``models/upscale_models/``. The loader returns a light handle; the
network itself belongs to the model manager like every model (loaded once, placed
on the GPU when used). How files are read and how the network runs tiled is in
``nodes/upscale_models.py``.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.loaders import fingerprinter, list_models, model_manager, validator
from nodes.managed_modules import ModuleHandle, acquire_module

UPSCALE_FOLDER = "upscale_models"
UPSCALE_MODEL = "UPSCALE_MODEL"


def _upscale_models(env: Any) -> list[str]:
    return list_models(env, UPSCALE_FOLDER, diffusers_marker=None)  # single files only


class UpscaleModelHandle(ModuleHandle):
    """UPSCALE_MODEL: its module is spandrel's descriptor (network on the compute device)."""

    @property
    def scale(self) -> int:
        """Output pixels per input pixel along each side, known before the network runs."""
        return int(self.loaded.descriptor.scale)

    @property
    def architecture(self) -> str:
        return self.loaded.descriptor.architecture.name


def _load(path, dtype) -> Any:
    from nodes.upscale_models import load_upscaler

    return load_upscaler(path, dtype)


@define_node(
    "UpscaleModelLoader",
    category="loaders",
    display_name="Load Upscale Model",
    inputs=[Input("model_name", T.COMBO, choices=_upscale_models,
                  tooltip="An upscale model (ESRGAN, Real-ESRGAN, SwinIR, HAT, ... as spandrel reads them) "
                          "in models/upscale_models, .safetensors or a weights-only .pth")],
    outputs=[Output("UPSCALE_MODEL", UPSCALE_MODEL)],
    validate=validator(UPSCALE_FOLDER, "model_name"),
    fingerprint=fingerprinter(UPSCALE_FOLDER, "model_name"),
)
def upscale_model_loader(ctx, model_name: str):
    """Load an upscale model; spandrel recognises its architecture and scale from the weights."""
    from nodes.upscale_models import UpscaleModelError

    handle = acquire_module(ctx, UPSCALE_FOLDER, model_name, "model_name", "upscale", _load, (UpscaleModelError,),
                            handle=UpscaleModelHandle, view=lambda loaded, placed: loaded.descriptor)
    d = handle.loaded.descriptor
    ctx.message(f"{model_name}: {d.architecture.name}, {d.scale}x, on {model_manager(ctx.env).device}")
    return (handle,)


@define_node(
    "ImageUpscaleWithModel",
    category="image/upscaling",
    display_name="Upscale Image (using Model)",
    inputs=[Input("upscale_model", UPSCALE_MODEL), Input("image", T.IMAGE),
            Input("tile_size", T.INT, default=512, min=64, max=4096, step=32, optional=True,
                  tooltip="Input pixels per tile; halved automatically if the GPU runs out of memory"),
            Input("overlap", T.INT, default=32, min=0, max=512, step=8, optional=True,
                  tooltip="Input pixels shared by neighbouring tiles (at most a quarter of the tile), "
                          "blended so no seam shows")],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def image_upscale_with_model(ctx, upscale_model, image, tile_size: int = 512, overlap: int = 32):
    """Upscale an IMAGE with the model, tile by tile so large images fit.

    An alpha channel is scaled bilinearly and kept. A result larger than the
    budget for one image is refused before the network runs.
    """
    import torch
    import torch.nn.functional as F

    from nodes.masking import as_image
    from nodes.resample import check_pixel_budget
    from nodes.upscale_models import UpscaleModelError, run_tiled

    if not isinstance(upscale_model, UpscaleModelHandle):
        raise NodeError(f"upscale_model must come from UpscaleModelLoader, got {type(upscale_model).__name__}",
                        "upscale_model")
    image = as_image(image)
    b, h, w, c = image.shape
    scale = upscale_model.scale
    check_pixel_budget(ctx.env, w * scale, h * scale, "image", f"the {scale}x upscaled image")
    rgb = image[..., :3] if c >= 3 else image.expand(b, h, w, 3)
    try:
        with upscale_model.module() as descriptor:
            out = run_tiled(descriptor, rgb.movedim(-1, 1).float(), int(tile_size), int(overlap),
                            progress=ctx.progress)
    except UpscaleModelError as exc:
        raise NodeError(str(exc), "upscale_model") from None
    out = out.movedim(1, -1)
    if c == 4:
        alpha = F.interpolate(image[..., 3:].movedim(-1, 1), size=out.shape[1:3], mode="bilinear",
                              align_corners=False).movedim(1, -1)
        out = torch.cat((out, alpha.clamp(0, 1)), dim=-1)
    return (out.contiguous(),)
