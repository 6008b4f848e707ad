"""Which models a model folder holds: one listing for the loaders' choices and the model routes.

``/api/models/{folder}`` (and ComfyUI's ``/models/{folder}``) and the loader nodes'
choices used to list separately and disagreed (the routes offered ``.sft`` files
the loaders refuse, and missed the nested diffusers folders the loaders offer).
Both now call :func:`model_names`, with the diffusers marker of :func:`marker_for`,
so a name a client is offered is a name a loader accepts.
"""
from __future__ import annotations

import os
from pathlib import Path

#: File types the loaders open: safetensors, and the pickle formats torch reads
#: with ``weights_only=True`` (refused with a clear message if that fails).
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: The file that marks a folder as one diffusers model (listed by its folder name, not
#: its files): a whole pipeline in checkpoints/, one component in vae/. Other folders
#: hold single files only.
#: A whole pipeline is marked by its index: a pipeline's, or a modular pipeline's (FLUX.3's folders).
PIPELINE_INDEXES = ("model_index.json", "modular_model_index.json")
DIFFUSERS_MARKERS: dict[str, str | tuple[str, ...]] = {"checkpoints": PIPELINE_INDEXES, "vae": "config.json",
                                                       "controlnet": "config.json", "diffusers": PIPELINE_INDEXES}
#: Folders whose loader reads diffusers folders only (ComfyUI's DiffusersLoader): loose files
#: there are not models it opens, so they are not listed.
FOLDERS_ONLY = frozenset({"diffusers"})


Marker = str | tuple[str, ...] | None


def marker_for(folder: str) -> Marker:
    return DIFFUSERS_MARKERS.get(folder)


def is_marked(path: Path, marker: Marker) -> bool:
    """Whether folder ``path`` holds ``marker`` (one of them, where it names several)."""
    return any((Path(path) / name).is_file() for name in _names(marker))


def _names(marker: Marker) -> tuple[str, ...]:
    return (marker,) if isinstance(marker, str) else marker or ()


def model_names(root: str | Path, diffusers_marker: Marker, files: bool = True) -> list[str]:
    """The names a loader accepts for the models in ``root`` (sorted; none if it is missing).

    Files are listed by their path below ``root`` (``sd15/model.safetensors``), unless
    ``files`` is False; a folder holding ``diffusers_marker``, at any depth, by its own path.
    Hidden entries are left out.
    """
    root = Path(root)
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel != Path(".") and any(name in filenames for name in _names(diffusers_marker)):
            names.append(rel.as_posix())
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names += [(rel / f).as_posix() for f in filenames
                  if files and f.lower().endswith(MODEL_EXTENSIONS) and not f.startswith(".")]
    return sorted(names)


def folder_models(models_root: str | Path, folder: str | tuple[str, ...]) -> list[str]:
    """The models of ``<models_root>/<folder>`` as that folder's loader lists them; for
    several folders read together (aliases), their union."""
    folders = (folder,) if isinstance(folder, str) else folder
    return sorted({n for f in folders
                   for n in model_names(Path(models_root) / f, marker_for(f), f not in FOLDERS_ONLY)})
