"""The model folders the node library's loaders read, for the routes that list every folder.

What a folder holds is :func:`engine.model_files.folder_models`, the one listing the
loaders' choices and every model route share; this only names the folders, so
``/api/models`` and ComfyUI's ``/experiment/models`` show a folder a loader reads
even before anything is put in it. A loader that reads a new folder adds it here.
"""
from __future__ import annotations

from nodes.loaders import CHECKPOINT_FOLDER, DIFFUSERS_FOLDER, VAE_FOLDER
from nodes.conditioning_files import EMBEDDINGS_FOLDER
from nodes.controlnet import CONTROLNET_FOLDER
from nodes.gligen import GLIGEN_FOLDER
from nodes.hypernetwork import HYPERNETWORK_FOLDER
from nodes.lora import LORA_FOLDER
from nodes.model_patch_nodes import MODEL_PATCH_FOLDER
from nodes.split_loaders import TEXT_FOLDERS, UNET_FOLDERS
from nodes.style_model import STYLE_FOLDER, VISION_FOLDER
from nodes.upscale import UPSCALE_FOLDER

FOLDERS: tuple[str, ...] = (CHECKPOINT_FOLDER, VAE_FOLDER, LORA_FOLDER, *UNET_FOLDERS, *TEXT_FOLDERS, EMBEDDINGS_FOLDER,
                            CONTROLNET_FOLDER, UPSCALE_FOLDER, VISION_FOLDER, STYLE_FOLDER, GLIGEN_FOLDER,
                            DIFFUSERS_FOLDER, MODEL_PATCH_FOLDER, HYPERNETWORK_FOLDER)
#: Each folder of a group that one loader reads together maps to the whole group.
ALIASES: dict[str, tuple[str, ...]] = {folder: group for group in (UNET_FOLDERS, TEXT_FOLDERS) for folder in group}
