"""Reading upscale models with spandrel, and running them tiled.

spandrel recognises the architecture (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...)
and its hyper-parameters from the state dict alone. Two facts shape this module:

* **torchvision.** spandrel declares torchvision as a dependency, but only two of
  its architectures use it (LaMa, an inpainter, and RestoreFormer, a face
  restorer); none of the upscalers does. Installing torchvision would replace the
  pinned CPU torch with another build, so Kiln installs spandrel without
  dependencies (see requirements-nodeps.txt). ``import spandrel`` still imports
  those two modules, so when torchvision is absent the import runs once with a
  stand-in ``torchvision`` whose functions raise a clear error if ever called; the
  stand-in is removed from ``sys.modules`` right after, so no other library sees
  it. With a real torchvision installed, spandrel is imported normally.
* **Files.** ``.safetensors`` are read with safetensors; pickle files only with
  ``torch.load(weights_only=True)``, the rule checkpoints follow, so a model file
  cannot run code.
"""
from __future__ import annotations

import contextlib
import enum
import importlib.util
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

_import_lock = threading.Lock()
_spandrel: Any = None


class UpscaleModelError(Exception):
    """A model file that cannot be used as an upscaler; the message says why."""


def _needs_torchvision(*_args: Any, **_kwargs: Any) -> Any:
    raise UpscaleModelError("this architecture needs torchvision, which Kiln does not install "
                            "(it would replace the pinned torch)")


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    root = types.ModuleType("torchvision")
    root.__path__ = []  # a package, so its submodules can be imported from it
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__path__ = []
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    functional.rotate = _needs_torchvision
    functional.normalize = _needs_torchvision
    root.transforms, transforms.functional = transforms, functional
    names = {"torchvision": root, "torchvision.transforms": transforms,
             "torchvision.transforms.functional": functional}
    sys.modules.update(names)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def spandrel() -> Any:
    """The spandrel module (imported once; see the module docstring about torchvision)."""
    global _spandrel
    with _import_lock:
        if _spandrel is None:
            if importlib.util.find_spec("spandrel") is None:
                raise UpscaleModelError("the 'spandrel' package is not installed; install the pinned version "
                                        "with: pip install --no-deps -r requirements-nodeps.txt")
            if importlib.util.find_spec("torchvision") is not None:
                import spandrel as module
            else:
                with _torchvision_stand_in():
                    import spandrel as module
            _spandrel = module
        return _spandrel


def read_weights(path: Path) -> dict[str, Any]:
    """The state dict in ``path`` (nested dicts such as ``params_ema`` kept for spandrel to unwrap)."""
    name = path.name
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UpscaleModelError(f"{name} is not a readable .safetensors file (truncated or corrupt?): "
                                    f"{exc}") from exc
    from nodes.checkpoint.pickle_file import PickleRefused, load_weights_only

    try:
        data = load_weights_only(path)
    except PickleRefused as exc:
        raise UpscaleModelError(f"{name} {exc}") from None
    if not isinstance(data, dict):
        raise UpscaleModelError(f"{name} does not hold a state dict of named tensors")
    return data


@dataclass
class LoadedUpscaler:
    """What the model manager stores: spandrel's descriptor, whose network it places on a device."""

    descriptor: Any

    def kiln_modules(self) -> dict[str, Any]:
        return {"model": self.descriptor.model}


def load_upscaler(path: Path, dtype: Any) -> LoadedUpscaler:
    """Read ``path`` and build the network spandrel recognises in it (float32, or ``dtype`` if it supports it)."""
    import torch

    sp = spandrel()
    state = sp.canonicalize_state_dict(read_weights(path))
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UpscaleModelError(f"{path.name} does not hold a state dict of named tensors")
    try:
        descriptor = sp.ModelLoader().load_from_state_dict(state)
    except sp.UnsupportedModelError:
        keys = ", ".join(list(state)[:3])
        raise UpscaleModelError(f"spandrel does not recognise the architecture of {path.name} ({len(state)} tensors, "
                                f"first keys: {keys}); it is not an upscale model spandrel {sp.__version__} "
                                f"supports") from None
    except Exception as exc:  # noqa: BLE001 - a recognised architecture whose tensors do not fit
        raise UpscaleModelError(f"spandrel could not build a model from {path.name}: {exc}") from exc
    if not isinstance(descriptor, sp.ImageModelDescriptor):
        raise UpscaleModelError(f"{path.name} is a {descriptor.architecture.name} model for {descriptor.purpose}, "
                                f"which needs more than an image (a mask); it is not an upscaler")
    descriptor.eval()
    if dtype == torch.float16 and descriptor.supports_half:
        descriptor.half()
    return LoadedUpscaler(descriptor)


def run_tiled(descriptor: Any, pixels: Any, tile: int, overlap: int, progress: Any = None) -> Any:
    """``pixels`` [B, 3, H, W] 0..1 through the network, tiled and blended; float32 CPU [B, 3, sH, sW].

    Models whose architecture tiles internally get the whole image. On running out
    of GPU memory the tile is halved (down to 64 px) and the image started again.
    """
    import torch

    from nodes.tiling import tiled_apply

    sp = spandrel()
    device, dtype = descriptor.device, descriptor.dtype

    def fn(t: Any) -> Any:
        return descriptor(t.to(device=device, dtype=dtype)).float()

    if descriptor.tiling == sp.ModelTiling.INTERNAL:
        tile = max(pixels.shape[-2:])
    while True:
        try:
            with torch.inference_mode():
                return tiled_apply(pixels, fn, tile, min(overlap, tile // 4), scale=descriptor.scale,
                                   progress=progress).clamp(0.0, 1.0)
        except torch.OutOfMemoryError:
            if tile <= 64:
                raise
            tile //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
