"""ComfyUI's model-saving nodes: CheckpointSave, ModelSave, CLIPSave and VAESave.

What a user saves is usually a merge (ModelMergeSimple and friends) or a model with LoRAs
baked in, so the weights are read from the handles in use, with their patch stacks applied,
one module at a time (only one is on the device while a file is put together), and streamed
to disk by safetensors. Each file has the key layout other tools and Kiln's own loaders read:
the original (LDM) layout for checkpoints and UNets (``nodes.checkpoint.to_original``), BFL's for
a FLUX transformer, transformers' for text encoders, in the dtype the model is held in, with
the workflow in its metadata as SaveImage embeds it. Files go to the output folder under
``filename_prefix`` by SaveImage's rule (ComfyUI's ``checkpoints/``, ``diffusion_models/``,
``clip/`` and ``vae/`` subfolders by default): move one into the matching models/ folder to
load it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Result, define_node
from nodes import image as image_nodes
from nodes import image_io
from nodes.families.encoder_names import clip_file_name
from nodes.handles import ClipHandle, ModelHandle, VaeHandle

CATEGORY = "advanced/model_merging"
#: Families whose whole checkpoint the original-layout writer knows.
SAVABLE = ("sd1", "sd2", "sdxl", "sdxl-refiner")
UNET_PREFIX = "model.diffusion_model."


class _Snapshot:
    """A module's weights copied to the CPU, with its config: what the layout writers read."""

    def __init__(self, module: Any, input_name: str) -> None:
        from nodes.runtime.merge import not_whole

        reason = not_whole(module, [name for name, _ in module.named_parameters()])
        if reason:
            raise NodeError(f"its weights are {reason}; saving needs them whole in memory (give Kiln more memory)",
                            input_name)
        self.config = module.config
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return self._state


def read_module(use: Callable[[], contextlib.AbstractContextManager], input_name: str) -> _Snapshot:
    with use() as module:
        return _Snapshot(module, input_name)


def _check(value: Any, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise NodeError(f"expected a {name.upper()} from a loader, got {type(value).__name__}", name)


def save_tensors(ctx, state: dict[str, Any], prefix: str) -> dict[str, str]:
    """Write ``state`` as ``prefix_NNNNN_.safetensors`` in the output folder; its ui entry."""
    from safetensors.torch import save_file

    folder, subfolder, base = image_nodes.save_folder(ctx.env, ctx.env.paths.output, prefix, "output")
    metadata = image_nodes.metadata_strings(ctx) or None
    name = image_io.publish_numbered(folder, base, ".safetensors",
                                     lambda path: save_file(state, str(path), metadata=metadata))
    ctx.message(f"saved {name}: {len(state)} tensors")
    return {"filename": name, "subfolder": subfolder, "type": "output"}


def _saver(node_type: str, display_name: str, inputs: list[Input]):
    return define_node(node_type, category=CATEGORY, display_name=display_name, output_node=True,
                       inputs=inputs, validate=image_nodes.save_validate)


@_saver("CheckpointSave", "Save Checkpoint", [Input("model", T.MODEL), Input("clip", T.CLIP), Input("vae", T.VAE),
                                              image_nodes.prefix_input("checkpoints/Kiln", "checkpoints/ComfyUI")])
def checkpoint_save(ctx, model, clip, vae, filename_prefix: str = "checkpoints/Kiln"):
    """Save the model, its text encoder(s) and VAE, LoRAs and merges baked in, as one original-layout
    checkpoint (SD 1.x, SD 2.x, SDXL, the refiner). SD 2's unused last OpenCLIP block, which Kiln
    does not keep, is written as small random values so the file has the layout tools expect."""
    from nodes.checkpoint.to_original import components_to_original

    _check(model, ModelHandle, "model")
    _check(clip, ClipHandle, "clip")
    _check(vae, VaeHandle, "vae")
    if model.family.name not in SAVABLE:
        raise NodeError(f"saving a {model.family.name} model as one checkpoint is not supported yet (only "
                        f"{', '.join(SAVABLE)}; ModelSave, CLIPSave and VAESave save the parts)", "model")
    if clip.family.name != model.family.name:
        raise NodeError(f"the CLIP is a {clip.family.name} one and the model a {model.family.name} one", "clip")
    parts: dict[str, Any] = {"unet": read_module(model.unet, "model"), "vae": read_module(vae.module, "vae")}
    for spec in clip.family.text_encoders:
        parts[spec.module] = read_module(lambda module=spec.module: clip.whole_encoder(module), "clip")
    state = components_to_original(parts, model.prediction_type)
    return Result(ui={"checkpoints": [save_tensors(ctx, state, filename_prefix)]})


@_saver("ModelSave", "Save Model", [Input("model", T.MODEL),
                                    image_nodes.prefix_input("diffusion_models/Kiln", "diffusion_models/ComfyUI")])
def model_save(ctx, model, filename_prefix: str = "diffusion_models/Kiln"):
    """Save the diffusion model alone (a UNet in the original layout, a FLUX transformer in BFL's),
    under ``model.diffusion_model.``, LoRAs and merges baked in; UNETLoader loads it."""
    from nodes.checkpoint.flux_keys import diffusers_to_bfl
    from nodes.checkpoint.to_original import unet_to_original

    _check(model, ModelHandle, "model")
    part = read_module(model.unet, "model")
    if model.family.name.startswith("flux"):
        state = {UNET_PREFIX + k: v for k, v in diffusers_to_bfl(part.state_dict()).items()}
    else:
        state = unet_to_original(part.state_dict(), dict(part.config))
        if model.prediction_type == "v_prediction":
            import torch

            state["v_pred"] = torch.tensor([])
    return Result(ui={"diffusion_models": [save_tensors(ctx, {k: v.contiguous() for k, v in state.items()},
                                                 filename_prefix)]})


@_saver("CLIPSave", "Save CLIP", [Input("clip", T.CLIP), image_nodes.prefix_input("clip/Kiln", "clip/ComfyUI")])
def clip_save(ctx, clip, filename_prefix: str = "clip/Kiln"):
    """Save each text encoder as its own file, ``prefix_clip_l``, ``prefix_t5xxl``, ... in
    transformers' layout (what CLIPLoader and DualCLIPLoader read), LoRAs and merges baked in."""
    _check(clip, ClipHandle, "clip")
    saved = []
    for spec in clip.family.text_encoders:
        part = read_module(lambda module=spec.module: clip.whole_encoder(module), "clip")
        saved.append(save_tensors(ctx, part.state_dict(), f"{filename_prefix}_{clip_file_name(clip.family, spec)}"))
    return Result(ui={"clip": saved})


@_saver("VAESave", "Save VAE", [Input("vae", T.VAE), image_nodes.prefix_input("vae/Kiln_vae", "vae/ComfyUI_vae")])
def vae_save(ctx, vae, filename_prefix: str = "vae/Kiln_vae"):
    """Save the VAE in the original layout without a prefix, as standalone VAE files come; VAELoader
    loads it."""
    from nodes.checkpoint.to_original import vae_to_original

    _check(vae, VaeHandle, "vae")
    part = read_module(vae.module, "vae")
    state = vae_to_original(part.state_dict(), dict(part.config))
    state = {k[len("first_stage_model."):]: v.contiguous() for k, v in state.items()}
    return Result(ui={"vae": [save_tensors(ctx, state, filename_prefix)]})
