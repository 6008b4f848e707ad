"""SaveLatent and LoadLatent: ComfyUI's ``.latent`` files.

A ``.latent`` file is a safetensors file holding the batch under ``latent_tensor``
(raw VAE space, Kiln's and ComfyUI's LATENT convention) and an empty marker tensor
``latent_format_version_0``. A file without the marker comes from ComfyUI's first
format, which stored latents multiplied by SD's scale factor 0.18215, so loading
divides it back out, as ComfyUI does. Only ``samples`` travels: a noise mask or batch
index of the LATENT is not part of the format.

Saving resolves its prefix exactly as SaveImage does (``nodes.image.save_folder``: one
rule that keeps every saved file inside the output folder, refused at validation), and
numbers files by the same atomic counter (``prefix_00001_.latent``). Loading lists the
input folder's ``.latent`` files as LoadImage lists images, checks the file at
validation, and fingerprints its content, so an edited file re-runs the node.
"""
from __future__ import annotations

from typing import Any, Mapping

from engine import types as T
from engine.context import Environment, NodeError
from engine.node import Input, Output, Result, define_node
from nodes import image as _image_nodes
from nodes import image_io as io_

EXTENSION = ".latent"
TENSOR_KEY = "latent_tensor"
VERSION_KEY = "latent_format_version_0"
#: What a file without the version marker was multiplied by when it was saved.
LEGACY_SCALE = 0.18215


@define_node(
    "SaveLatent",
    category="_for_testing",
    output_node=True,
    inputs=[Input("samples", T.LATENT), _image_nodes.prefix_input("latents/Kiln", "latents/ComfyUI")],
    validate=_image_nodes.save_validate,
)
def save_latent(ctx, samples, filename_prefix: str = "latents/Kiln"):
    """Save the latent batch as ``prefix_00001_.latent`` in the output folder (ComfyUI's format).

    The workflow is embedded in the file's metadata as SaveImage embeds it in PNGs
    (left out when the environment turns ``embed_workflow`` off). Copy the file into
    the input folder to load it again with LoadLatent.
    """
    import torch
    from safetensors.torch import save

    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise NodeError("expected a LATENT (a dict with a 'samples' tensor)", "samples")
    folder, subfolder, base = _image_nodes.save_folder(ctx.env, ctx.env.paths.output, filename_prefix, "output")
    tensors = {TENSOR_KEY: samples["samples"].detach().to("cpu").contiguous(), VERSION_KEY: torch.tensor([])}
    data = save(tensors, metadata=_image_nodes.metadata_strings(ctx) or None)
    name = io_.write_numbered_atomic(folder, base, EXTENSION, lambda f: f.write(data))
    return Result(ui={"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]})


def _input_latents(env: Environment) -> list[str]:
    return env.paths.input.list((EXTENSION,))


def _locate(env: Environment, name: Any):
    return io_.locate_file(env, name, "latent", what="latent")


def _load_validate(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    try:
        _locate(env, inputs.get("latent"))
    except NodeError as exc:
        return [("latent", str(exc))]
    return []


def _load_fingerprint(env: Environment, inputs: Mapping[str, Any]) -> str:
    # The content, as LoadImage's: an edited file re-runs the node, a touched one does not.
    return io_.file_sha256(_locate(env, inputs.get("latent")))


@define_node(
    "LoadLatent",
    category="_for_testing",
    inputs=[Input("latent", T.COMBO, choices=_input_latents, tooltip="A .latent file in the input folder")],
    outputs=[Output("LATENT", T.LATENT)],
    validate=_load_validate,
    fingerprint=_load_fingerprint,
)
def load_latent(ctx, latent: str):
    """Load a ``.latent`` file from the input folder (as SaveLatent or ComfyUI wrote it) as a float32 LATENT.

    A file of ComfyUI's first format (no version marker) is divided by 0.18215, which
    that format had multiplied in, so both kinds load into raw VAE space.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = _locate(ctx.env, latent)
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise NodeError(f"'{latent}' is not a readable .latent (safetensors) file: {exc}", "latent") from None
    if TENSOR_KEY not in tensors:
        found = ", ".join(sorted(tensors)) or "none"
        raise NodeError(f"'{latent}' has no '{TENSOR_KEY}' tensor (its keys: {found}); it is not a .latent "
                        f"file as SaveLatent writes them", "latent")
    samples = tensors[TENSOR_KEY].float()
    if VERSION_KEY not in tensors:
        samples = samples * (1.0 / LEGACY_SCALE)
    return ({"samples": samples},)
