"""Which models a model folder holds: one listing for the loaders' choices and the model routes.

``/api/models/{folder}`` (and ComfyUI's ``/models/{folder}``) and the loader nodes'
choices used to list separately and disagreed (the routes offered ``.sft`` files
the loaders refuse, and missed the nested diffusers folders the loaders offer).
Both now call :func:`model_names`, so a name a client is offered is a name a
loader accepts.
"""
from __future__ import annotations

import os
from pathlib import Path

#: File types the loaders open: safetensors, and the pickle formats torch reads
#: with ``weights_only=True`` (refused with a clear message if that fails).
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: The file that marks a folder as one diffusers model (listed by its folder name, not
#: its files): a whole pipeline in checkpoints/, one component (config.json) elsewhere.
DIFFUSERS_MARKERS = {"checkpoints": "model_index.json"}
DEFAULT_MARKER = "config.json"


def marker_for(folder: str) -> str:
    return DIFFUSERS_MARKERS.get(folder, DEFAULT_MARKER)


def model_names(models_root: str | Path, folder: str) -> list[str]:
    """The names a loader accepts for the models in ``<models_root>/<folder>``, sorted; none if it is missing.

    Files are listed by their path below the folder (``sd15/model.safetensors``),
    diffusers folders at any depth by theirs. Hidden files and folders, and symlinks
    that lead outside the folder, are left out.
    """
    root = Path(models_root) / folder
    marker = marker_for(folder)
    real_root = Path(os.path.realpath(root))
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        real = Path(os.path.realpath(dirpath))
        if real != real_root and real_root not in real.parents:
            dirnames[:] = []
            continue
        if marker in filenames and rel != Path("."):
            names.append(rel.as_posix())
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith(".") or not f.lower().endswith(MODEL_EXTENSIONS):
                continue
            target = Path(os.path.realpath(Path(dirpath) / f))
            if real_root in target.parents:
                names.append((rel / f).as_posix())
    return sorted(names)
