"""ComfyUI's model patches: ModelPatchLoader (``models/model_patches``) and QwenImageDiffsynthControlnet
(USO's style projector, also read here, is applied by USOStyleReference: nodes.uso).

A "model patch" in ComfyUI is a network that hooks into a diffusion model's blocks rather than riding on
the conditioning. Kiln reads the ones it can run into the same light handle ControlNetLoader returns,
owned by the model manager, and QwenImageDiffsynthControlnet puts it, with its control image, VAE and
strength, on the MODEL, acting on both sides of guidance at every step; strength 0 returns the model
unchanged:

* alibaba-pai's Z-Image Fun ControlNet Union (nodes/control/z_image.py) goes to
  ``SamplingPatches.model_control``, which the denoiser stacks on every conditioning's ControlNets
  (the residual seam, nodes/control/apply.py);
* DiffSynth's Qwen-Image blockwise ControlNets (nodes/control/blockwise.py) go to
  ``SamplingPatches.blockwise``, hooked after the transformer's blocks while the sampler runs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.control.apply import ControlLink, ControlNetHandle
from nodes.loaders import fingerprinter, list_models, locate, model_manager, validator

MODEL_PATCH_FOLDER = "model_patches"
MODEL_PATCH = "MODEL_PATCH"


def _patches(env: Any) -> list[str]:
    return list_models(env, MODEL_PATCH_FOLDER, None)


def load_model_patch(path: Any, dtype: Any) -> Any:
    """The model manager's loader: a file ComfyUI's ModelPatchLoader reads, if Kiln runs its kind, in the dtype
    of the family it patches (``dtype`` may be the manager's rule: nodes.runtime.precision.resolve)."""
    from nodes.checkpoint.load import CheckpointError, read_state_dict
    from nodes.checkpoint.load import file_metadata
    from nodes.control import anima_lllite, blockwise
    from nodes.control import z_image as fun
    from nodes import uso
    from nodes.control.load import LoadedControlNet
    from nodes.families import anima, flux, qwen_image, z_image
    from nodes.runtime.precision import resolve

    state = read_state_dict(path)
    if anima_lllite.is_anima_lllite(state):
        network, info = anima_lllite.load(state, path.name, resolve(dtype, anima.FAMILY), file_metadata(path))
        family = anima.FAMILY
    elif uso.is_uso_projector(state):
        network, info = uso.load(state, path.name, resolve(dtype, flux.FAMILY))
        family = flux.FAMILY
    elif fun.is_fun_controlnet(state):
        network, info = fun.load(state, path.name, resolve(dtype, z_image.FAMILY))
        family = z_image.FAMILY
    elif blockwise.is_blockwise(state):
        network, info = blockwise.load(state, path.name, resolve(dtype, qwen_image.FAMILY))
        family = qwen_image.FAMILY
    else:
        keys = sorted(state)
        raise CheckpointError(f"{path.name} is not a model patch Kiln runs: it reads alibaba-pai's Z-Image Fun "
                              f"ControlNet Union ({fun.MARKER}), DiffSynth's Qwen-Image blockwise ControlNets "
                              f"({blockwise.MARKER}), USO's style projector ({uso.MARKER}) and Anima LLLites "
                              f"({anima_lllite.MARKER}); the file holds "
                              f"{len(keys)} tensors such as "
                              f"{', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return LoadedControlNet(family=family, network=network.eval().requires_grad_(False), info=info)


@define_node(
    "ModelPatchLoader",
    category="advanced/loaders",
    display_name="ModelPatchLoader",
    inputs=[Input("name", T.COMBO, choices=_patches,
                  tooltip="A model patch in models/model_patches (Z-Image Fun ControlNet Union, DiffSynth's "
                          "Qwen-Image ControlNets, USO's style projector, Anima LLLites)")],
    outputs=[Output("MODEL_PATCH", MODEL_PATCH)],
    validate=validator(MODEL_PATCH_FOLDER, "name"),
    fingerprint=fingerprinter(MODEL_PATCH_FOLDER, "name"),
)
def model_patch_loader(ctx, name: str):
    """Load a model patch once; what it is comes from its keys (nodes.controlnet.held_controlnet)."""
    from nodes.controlnet import held_controlnet
    from nodes.runtime.models import file_key

    path = locate(ctx.env, MODEL_PATCH_FOLDER, name, "name")
    manager = model_manager(ctx.env)
    loader = functools.partial(lambda p, m: load_model_patch(p, m.dtype_rule), path)
    loaded, handle = held_controlnet(manager, file_key(path, "model_patch"), loader, name, "name")
    ctx.message(f"{name}: {loaded.info.get('format')}, on {manager.device}")
    return (handle,)


@define_node(
    "QwenImageDiffsynthControlnet",
    category="advanced/loaders/qwen",
    display_name="QwenImageDiffsynthControlnet",
    inputs=[Input("model", T.MODEL), Input("model_patch", MODEL_PATCH),
            Input("vae", T.VAE, tooltip="The model's VAE, which encodes the control image"),
            Input("image", T.IMAGE, tooltip="The control image (e.g. Canny edges), 0..1 RGB"),
            Input("strength", T.FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01),
            Input("mask", T.MASK, optional=True,
                  tooltip="What to repaint (1), for an inpainting patch (DiffSynth's inpaint, Z-Image Fun 2.x); "
                          "others ignore it")],
    outputs=[Output("MODEL", T.MODEL)],
)
def qwen_image_diffsynth_controlnet(ctx, model, model_patch, vae, image, strength: float, mask: Any = None):
    """The model with this ControlNet on every step, both sides of guidance; strength 0 changes nothing."""
    from nodes.controlnet import _hint, check_hint_vae

    if not hasattr(model, "patches") or not hasattr(model, "family"):
        raise NodeError("model must be a MODEL from a loader", "model")
    if not isinstance(model_patch, ControlNetHandle):
        raise NodeError(f"model_patch must come from ModelPatchLoader, got {type(model_patch).__name__}",
                        "model_patch")
    if model_patch.config.get("kind") == "anima-lllite":
        raise NodeError(f"{model_patch.name} is an Anima LLLite: apply it with AnimaLLLiteApply", "model_patch")
    if model_patch.config.get("kind") == "uso-projector":
        raise NodeError(f"{model_patch.name} is USO's style projector: apply it with USOStyleReference",
                        "model_patch")
    blockwise = model_patch.config.get("kind") == "diffsynth-blockwise"
    if model.family.controlnet_group != model_patch.family.controlnet_group:
        what = "a DiffSynth blockwise ControlNet" if blockwise else "a Z-Image Fun ControlNet"
        raise NodeError(f"{model_patch.name} is a {model_patch.family.name} model patch ({what}) and the model is "
                        f"{model.family.name}: load a {model_patch.family.name} model", "model")
    hint = _hint(image)
    kept = None
    inpaints = model_patch.config.get("mask_channels") if blockwise else \
        int(model_patch.config.get("control_in_dim") or 0) > model.family.latent.channels
    if mask is not None and inpaints:
        from nodes.masking import as_mask

        kept = as_mask(mask, "mask").unsqueeze(1)  # [B, 1, H, W]
        # 1 where the image is kept: DiffSynth's soft (1 - mask), the Z-Image pipeline's binarised one
        kept = 1.0 - kept if blockwise else (kept < 0.5).to(kept.dtype)
    elif mask is not None:  # as ComfyUI, a patch without a mask input ignores it
        ctx.message(f"mask: {model_patch.name} reads no inpainting mask; it is applied without it")
    if float(strength) == 0.0:
        return (model,)
    check_hint_vae(vae, model_patch.name, model.family)
    field = "blockwise" if blockwise else "model_control"
    link = ControlLink(model_patch, hint, float(strength), previous=getattr(model.patches, field),
                       applied_by="QwenImageDiffsynthControlnet", vae=vae, mask=kept)
    return (dataclasses.replace(model, patches=dataclasses.replace(model.patches, **{field: link})),)
