"""Which family a diffusers pipeline folder belongs to, checked in one ordered table.

Most flow families save ``transformer/`` beside their text encoders and VAE, so a folder is told apart
by the class names its configs give; where two families could both claim one (FLUX.2 and FLUX, Chroma,
Ovis-Image, Z-Image, Lumina 2: all have ``transformer/``), the more specific check must run first. The order lives
here, once, rather than in a chain of ifs inside the checkpoint loader.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import Loaded
from nodes.runtime.precision import resolve

#: (module under nodes.checkpoint, its folder test, the family under nodes.families whose dtypes it loads in)
#: in the order they are tried; each module's ``load_folder(path, dtype, offload=...)`` loads what its test
#: claims (SD3's takes no ``offload``).
FAMILY_FOLDERS: tuple[tuple[str, str, str], ...] = (
    ("hidream_load", "is_folder", "hidream"),  # before SD3: text_encoder_3/ and a transformer/ as SD3's folders have
    ("sd3_load", "is_sd3_folder", "sd3"),
    ("krea2_load", "is_krea2_folder", "krea2"),
    ("longcat_load", "is_folder", "longcat"),
    ("kandinsky5_load", "is_folder", "kandinsky5"),
    ("joyimage_load", "is_folder", "joyimage"),
    ("ernie_image_load", "is_folder", "ernie_image"),
    ("qwen_image21_load", "is_folder", "qwen_image21"),
    ("flux3_load", "is_folder", "flux3"),
    ("flux2_load", "is_flux2_folder", "flux2"),  # before FLUX and Chroma
    ("qwen_image_load", "is_qwen_image_folder", "qwen_image"),
    ("ovis_load", "is_folder", "ovis"),  # before FLUX
    ("z_image_load", "is_z_image_folder", "z_image"),  # before FLUX
    ("lumina2_load", "is_folder", "lumina2"),
    ("pixart_load", "is_folder", "pixart"),
    ("auraflow_load", "is_folder", "auraflow"),
    ("chroma_load", "is_chroma_folder", "chroma"),  # before FLUX
    ("cosmos_load", "is_folder", "cosmos"),  # before FLUX: its folders have model_index.json and transformer/
    ("hunyuan_video15_load", "is_folder", "hunyuan_video15"),  # before FLUX (transformer/, text_encoder_2/)
    ("hunyuan_image_load", "is_folder", "hunyuan_image"),  # before FLUX; the refiner's folders too
    ("flux_load", "is_flux_folder", "flux"),
)


def load_family_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded | None:
    """The folder loaded by the first family whose test claims it; None when none does (an SD-style
    pipeline folder, or not a pipeline at all: the checkpoint loader decides)."""
    for module_name, test, family in FAMILY_FOLDERS:
        module = importlib.import_module(f"nodes.checkpoint.{module_name}")
        if getattr(module, test)(path):
            dtype = resolve(dtype, importlib.import_module(f"nodes.families.{family}").FAMILY)
            if module_name == "sd3_load":
                return module.load_folder(path, dtype)
            return module.load_folder(path, dtype, offload=offload)
    return None
