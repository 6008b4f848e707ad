"""CheckpointSave: a MODEL, CLIP and VAE written as one single-file checkpoint, ComfyUI's node.

What a user saves is usually a merge (ModelMergeSimple and friends) or a model with LoRAs
baked in, so the weights are read from the handles in use, with their patch stacks applied.
The file has the original (LDM) key layout every tool loads (``nodes.checkpoint.to_original``,
the layout Kiln's loader reads back through diffusers' converters), in the dtype the model
is held in, with a ``v_pred`` key for v-prediction models, and the workflow in its metadata as
SaveImage embeds it. It goes to the output folder under ``filename_prefix`` (ComfyUI's
``checkpoints/`` subfolder by default) by SaveImage's rule: move it to models/checkpoints/ to
load it. SD 1.x, SD 2.x, SDXL and the SDXL refiner; FLUX has no original-layout writer yet.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Result, define_node
from nodes import image as image_nodes
from nodes import image_io
from nodes.handles import ClipHandle, ModelHandle, VaeHandle

#: Families the original-layout writer knows.
SAVABLE = ("sd1", "sd2", "sdxl", "sdxl-refiner")


class _Snapshot:
    """A module's weights copied to the CPU, with its config: what the layout writer reads."""

    def __init__(self, module: Any, input_name: str) -> None:
        from nodes.runtime.merge import not_whole

        names = [name for name, _ in module.named_parameters()]
        reason = not_whole(module, names)
        if reason:
            raise NodeError(f"its weights are {reason}; saving needs them whole in memory (give Kiln more memory)",
                            input_name)
        self.config = module.config
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _read(use: Callable[[], contextlib.AbstractContextManager], input_name: str) -> _Snapshot:
    """One module at a time: only one is on the device while the file is put together."""
    with use() as module:
        return _Snapshot(module, input_name)


@define_node(
    "CheckpointSave",
    category="advanced/model_merging",
    display_name="Save Checkpoint",
    output_node=True,
    inputs=[Input("model", T.MODEL), Input("clip", T.CLIP), Input("vae", T.VAE),
            Input("filename_prefix", T.STRING, default="checkpoints/Kiln", comfy_default="checkpoints/ComfyUI",
                  tooltip="File name start; may include a subfolder, always inside the output folder")],
    validate=image_nodes.save_validate,
)
def checkpoint_save(ctx, model, clip, vae, filename_prefix: str = "checkpoints/Kiln"):
    """Save the model, its text encoder(s) and VAE, LoRAs and merges baked in, as
    ``prefix_00001_.safetensors`` in the output folder."""
    from safetensors.torch import save_file

    from nodes.checkpoint.to_original import components_to_original

    for value, kind, name in ((model, ModelHandle, "model"), (clip, ClipHandle, "clip"), (vae, VaeHandle, "vae")):
        if not isinstance(value, kind):
            raise NodeError(f"expected a {name.upper()} from a loader, got {type(value).__name__}", name)
    if model.family.name not in SAVABLE:
        raise NodeError(f"saving a {model.family.name} model as one checkpoint is not supported yet (only "
                        f"{', '.join(SAVABLE)})", "model")
    if clip.family.name != model.family.name:
        raise NodeError(f"the CLIP is a {clip.family.name} one and the model a {model.family.name} one", "clip")
    parts: dict[str, Any] = {"unet": _read(model.unet, "model"), "vae": _read(vae.module, "vae")}
    for spec in clip.family.text_encoders:
        parts[spec.module] = _read(lambda module=spec.module: clip.encoder(module), "clip")
    state = components_to_original(parts, model.prediction_type)
    folder, subfolder, base = image_nodes.save_folder(ctx.env, ctx.env.paths.output, filename_prefix, "output")
    metadata = image_nodes.metadata_strings(ctx) or None
    name = image_io.publish_numbered(folder, base, ".safetensors",
                                     lambda path: save_file(state, str(path), metadata=metadata))
    note = f"saved {name}: {len(state)} tensors"
    if model.family.name == "sd2":
        note += ("; SD 2's unused last OpenCLIP block and projection, which Kiln does not keep, are written as "
                 "small random values so the file has the layout other tools expect")
    ctx.message(note)
    return Result(ui={"checkpoints": [{"filename": name, "subfolder": subfolder, "type": "output"}]})
