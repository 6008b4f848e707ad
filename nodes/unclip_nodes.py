"""unCLIPCheckpointLoader and unCLIPConditioning, with ComfyUI's names and inputs: SD 2.1 unCLIP
("image variations"), where a picture's CLIP image embedding steers the UNet beside the prompt.

ComfyUI's graph: unCLIPCheckpointLoader -> (MODEL, CLIP, VAE, CLIP_VISION); LoadImage ->
CLIPVisionEncode (that CLIP_VISION) -> unCLIPConditioning (the prompt's conditioning) ->
KSampler. The conditioning node only records the embedding, strength and noise augmentation
on each entry; the vector the UNet takes is made when sampling starts (nodes.unclip), and the
unCLIP family hands it to the UNet (nodes.families.sd2_unclip).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.conditioning_nodes import COND, _entries
from nodes.loaders import (CHECKPOINT_FOLDER, _checkpoint_handles, _checkpoints, fingerprinter, locate,
                           model_manager, validator)
from nodes.managed_modules import ModuleHandle
from nodes.style_model import CLIP_VISION, CLIP_VISION_OUTPUT


@define_node(
    "unCLIPCheckpointLoader",
    category="loaders",
    display_name="unCLIP Checkpoint Loader",
    inputs=[Input("ckpt_name", T.COMBO, choices=_checkpoints,
                  tooltip="An SD 2.1 unCLIP checkpoint (sd21-unclip-l / -h) in models/checkpoints: UNet, text "
                          "encoder, VAE and the CLIP image encoder in one file")],
    outputs=[Output("MODEL", T.MODEL), Output("CLIP", T.CLIP), Output("VAE", T.VAE),
             Output("CLIP_VISION", CLIP_VISION)],
    validate=validator(CHECKPOINT_FOLDER, "ckpt_name"),
    fingerprint=fingerprinter(CHECKPOINT_FOLDER, "ckpt_name"),
)
def unclip_checkpoint_loader(ctx, ckpt_name: str):
    """Load the checkpoint once (as CheckpointLoader does) and also hand out its image encoder."""
    from nodes.loaders import _load_checkpoint
    from nodes.runtime.models import file_key
    from nodes.vision_models import LoadedVision
    from nodes.clip_vit import CLIP_MEAN, CLIP_STD

    model, clip, vae = _checkpoint_handles(ctx, locate(ctx.env, CHECKPOINT_FOLDER, ckpt_name, "ckpt_name"),
                                           ckpt_name, "ckpt_name")
    if "noise_augmentor" not in model.extra:
        raise NodeError(f"{ckpt_name} is a {model.family.name} checkpoint, not an unCLIP one (its UNet takes no "
                        "image embedding); load it with CheckpointLoaderSimple", "ckpt_name")
    path = locate(ctx.env, CHECKPOINT_FOLDER, ckpt_name, "ckpt_name")
    manager, key = model_manager(ctx.env), file_key(path, "checkpoint")
    loader = functools.partial(_load_checkpoint, path)  # CheckpointLoader's key and load: one copy
    encoder = manager.acquire(key, loader).modules["clip_vision"]
    size = int(encoder.config.image_size)

    @contextlib.contextmanager
    def use():
        with manager.use(key, "clip_vision", loader) as placed:
            yield placed

    # the handle keeps no module of its own: the manager owns (and may evict) the encoder
    vision = ModuleHandle(name=ckpt_name, loaded=LoadedVision(None, size, CLIP_MEAN, CLIP_STD, "CLIP ViT"), _use=use)
    return (model, clip, vae, vision)


@define_node(
    "unCLIPConditioning",
    category="conditioning",
    inputs=[Input("conditioning", T.CONDITIONING), Input("clip_vision_output", CLIP_VISION_OUTPUT),
            Input("strength", T.FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01,
                  tooltip="How strongly the image steers (0: not at all)"),
            Input("noise_augmentation", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.01,
                  tooltip="Noise added to the image embedding: higher follows the picture more loosely")],
    outputs=COND,
)
def unclip_conditioning(ctx, conditioning: Any, clip_vision_output: Any, strength: float,
                        noise_augmentation: float):
    """Record the image embedding on every entry (appended to any earlier unCLIP records, which
    sampling sums); strength 0 returns the conditioning unchanged, as ComfyUI does."""
    from nodes.unclip import KEY
    from nodes.vision_models import VisionOutput

    if not isinstance(clip_vision_output, VisionOutput):
        raise NodeError(f"must come from CLIPVisionEncode, got {type(clip_vision_output).__name__}",
                        "clip_vision_output")
    if clip_vision_output.kind != "CLIP ViT":
        raise NodeError(f"holds a {clip_vision_output.kind} image encoding; unCLIP takes a CLIP ViT image embedding "
                        "(encode with the unCLIP checkpoint's CLIP_VISION)", "clip_vision_output")
    strength, noise_augmentation = float(strength), float(noise_augmentation)
    if not -10.0 <= strength <= 10.0:
        raise NodeError(f"must be within -10..10, got {strength}", "strength")
    if not 0.0 <= noise_augmentation <= 1.0:
        raise NodeError(f"must be within 0..1, got {noise_augmentation}", "noise_augmentation")
    entries = _entries(conditioning, "conditioning")
    if strength == 0:
        return (conditioning,)
    record = {"clip_vision_output": clip_vision_output, "strength": strength,
              "noise_augmentation": noise_augmentation}
    out = []
    for embeds, extra in entries:
        extra[KEY] = list(extra.get(KEY) or []) + [record]
        out.append([embeds, extra])
    return (out,)
