"""Reading a PyTorch pickle file (.pt, .pth, .ckpt, .bin) without running code from it.

One rule for every loader that accepts such files (checkpoints, upscale models, the safety checker,
hypernetworks): ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
Its refusals are told apart, because they need different advice: a file whose pickle names code
(a class or function to call) could load with ``weights_only=False`` and is refused on purpose; a
file that is not a pickle or a zip at all, or is cut short, is damaged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class PickleRefused(ValueError):
    """The file cannot be read safely; the message says why, without the file's name (callers add it)."""


def load_weights_only(path: Path) -> Any:
    """The file's contents as ``torch.load(weights_only=True)`` gives them, on the CPU."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise PickleRefused("is a pickle file that needs arbitrary code to load, which Kiln refuses for safety "
                                "(torch.load with weights_only=True); convert it to .safetensors") from None
        raise PickleRefused("could not be read as a PyTorch file (damaged, or not one)") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF errors of a damaged file
        raise PickleRefused(f"could not be read as a PyTorch file (truncated or corrupt?): {exc}") from None
