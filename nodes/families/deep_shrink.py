"""Kohya's Deep Shrink (ComfyUI's PatchModelAddDownscale): during the noisiest part of the run,
the UNet's features are shrunk after one encoder block and grown back in the decoder, so the
deep layers compose the picture at the size they were trained for while the outer ones draw
the full-size detail. It lets SD models make images well above their training size without
repeated subjects.

ComfyUI numbers the encoder's outputs as its input blocks: 0 is conv_in, then each resnet
(with its attention, where the level has one), then each downsampler, level by level, which is
exactly the list of skips the decoder consumes (nodes.families.freeu.decoder_skips). While the
evaluation's noise level lies in [sigma_end, sigma_start], the output of block ``block_number``
is resized by 1 / ``downscale_factor`` with ``downscale_method``: before the skip is taken
(both the skip and the path onwards shrink) or, with ``after_skip``, only on the path onwards.
In the decoder, before each join with a skip, features of another size are resized to the
skip's with ``upscale_method``, and each upsampler is given the size of the skip it leads to
(ComfyUI's Upsample takes that size; diffusers' Upsample2D takes it as ``output_size``).

Kiln does this with hooks on the diffusers UNet while the sampling loop runs, as FreeU does:
a pre-hook on the UNet reads the evaluation's timestep (its level from the training
schedule), forward hooks on the encoder's block outputs record the skip sizes and shrink,
a pre-hook on the next block shrinks after the skip, and decoder hooks resize to the skips.
Outside the window every hook leaves its tensor untouched, so those steps are bit for bit the
unpatched network's.

A ControlNet's residuals are sized for the unshrunk network. ComfyUI adds each where it is
applied (to the skip as the decoder takes it, to the middle block's output) and skips one
whose size no longer matches; diffusers adds them all inside its forward, where a shrunk skip
would make it fail. Inside the window Kiln therefore takes the residuals out of the UNet call
and adds them itself, as ComfyUI does: to the skip part of each decoder resnet's joined input
(before FreeU sees it) and to the middle block's output, each only where the sizes agree.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from nodes.families.unet_network import unet_of
from nodes.families.freeu import decoder_skips
from nodes.runtime.compiled import while_hooked

if TYPE_CHECKING:
    import torch


def encoder_blocks(unet: Any) -> list[tuple[Any, Any]]:
    """ComfyUI's input blocks in order, each as (the module it starts with, the module whose
    output is its skip): conv_in, every resnet (ending in its attention where there is one),
    every downsampler."""
    blocks = [(unet.conv_in, unet.conv_in)]
    for level in unet.down_blocks:
        attentions = list(getattr(level, "attentions", None) or [None] * len(level.resnets))
        blocks += [(resnet, attention or resnet) for resnet, attention in zip(level.resnets, attentions)]
        blocks += [(down, down) for down in (level.downsamplers or [])]
    return blocks


def decoder_feeds(unet: Any) -> list[Any]:
    """For each decoder resnet in order, the module whose output it joins with its skip: the
    middle block, the previous resnet (or its attention), or the previous level's upsampler."""
    feeds, previous = [], unet.mid_block
    for level in unet.up_blocks:
        attentions = list(getattr(level, "attentions", None) or [None] * len(level.resnets))
        for resnet, attention in zip(level.resnets, attentions):
            feeds.append(previous)
            previous = attention or resnet
        if level.upsamplers:
            previous = level.upsamplers[0]
    return feeds


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, tensor: Any) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def resized(h: "torch.Tensor", height: int, width: int, method: str) -> "torch.Tensor":
    """``h`` at height x width by ``method`` (nodes.resample's, ComfyUI's common_upscale
    without cropping); ``h`` itself when it has that size already."""
    from nodes.resample import resize

    if tuple(h.shape[-2:]) == (height, width):
        return h
    return resize(h.float(), width, height, method).to(h.dtype)


@dataclass
class _Evaluation:
    """What one UNet call has seen so far: whether it is in the window, the skip sizes."""

    active: bool = False
    skips: list = field(default_factory=list)
    #: A ControlNet's residuals taken out of the call (None: none, or diffusers adds them).
    down: Any = None
    mid: Any = None


@contextlib.contextmanager
def applied(network: Any, settings: Any, schedule: Any) -> Iterator[None]:
    """``network`` (a diffusers UNet) with Deep Shrink's hooks while the block runs; nothing
    when ``settings`` (nodes.handles.DeepShrinkSettings) is None. ``schedule`` gives the level
    of the timestep each call receives."""
    if settings is None:
        yield
        return
    unet = unet_of(network, "PatchModelAddDownscale (Deep Shrink)")
    blocks, feeds = encoder_blocks(unet), decoder_feeds(unet)
    now = _Evaluation()
    n = settings.block_number

    def shrink(h: "torch.Tensor") -> "torch.Tensor":
        factor = settings.downscale_factor
        return resized(h, round(h.shape[-2] / factor), round(h.shape[-1] / factor), settings.downscale_method)

    def started(module: Any, args: tuple, kwargs: dict) -> Any:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        level = float(schedule.sigma(float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else timestep))
        now.active, now.skips = settings.sigma_end <= level <= settings.sigma_start, []
        now.down = now.mid = None
        if now.active and kwargs.get("down_block_additional_residuals") is not None:
            now.down, now.mid = kwargs["down_block_additional_residuals"], kwargs.get("mid_block_additional_residual")
            return args, {**kwargs, "down_block_additional_residuals": None, "mid_block_additional_residual": None}
        return None

    def controlled(position: int, skip_channels: int) -> Any:
        def hook(module: Any, args: tuple) -> Any:
            if now.down is None:
                return None
            residual, x = now.down[len(now.skips) - 1 - position], args[0]
            width = x.shape[1] - skip_channels
            if residual.shape != x[:, width:].shape:
                return None  # sized for an unshrunk skip: left out, as ComfyUI leaves it
            import torch

            return (torch.cat([x[:, :width], x[:, width:] + residual], dim=1), *args[1:])
        return hook

    def middle_controlled(module: Any, args: tuple, output: Any) -> Any:
        if now.mid is None or now.mid.shape != output.shape:
            return None
        return output + now.mid

    def block_done(index: int) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> Any:
            h = _first(output)
            changed = now.active and index == n and not settings.after_skip
            if changed:
                h = shrink(h)
            now.skips.append(tuple(h.shape[-2:]))
            return _with_first(output, h) if changed else None
        return hook

    def onwards(module: Any, args: tuple) -> Any:
        if now.active and len(now.skips) == n + 1:  # block n has just given its skip
            return (shrink(args[0]), *args[1:])
        return None

    def joins(position: int) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> Any:
            target = now.skips[len(now.skips) - 1 - position]
            h = _first(output)
            if tuple(h.shape[-2:]) == target:
                return None
            return _with_first(output, resized(h, *target, settings.upscale_method))
        return hook

    def upsampling(position: int) -> Any:
        def hook(module: Any, args: tuple) -> Any:
            target = now.skips[len(now.skips) - 1 - position]
            h = args[0]
            if (2 * h.shape[-2], 2 * h.shape[-1]) == target:
                return None  # diffusers' doubling is that size already
            return (h, target, *args[2:])
        return hook

    handles = [unet.register_forward_pre_hook(started, with_kwargs=True),
               unet.mid_block.register_forward_hook(middle_controlled)]  # before the resize to the skip
    handles += [resnet.register_forward_pre_hook(controlled(i, skip), prepend=True)  # before FreeU's
                for i, (resnet, skip) in enumerate(decoder_skips(unet))]
    handles += [out.register_forward_hook(block_done(i)) for i, (_, out) in enumerate(blocks)]
    if settings.after_skip and n < len(blocks):
        following = blocks[n + 1][0] if n + 1 < len(blocks) else unet.mid_block
        handles.append(following.register_forward_pre_hook(onwards))
    handles += [feed.register_forward_hook(joins(i)) for i, feed in enumerate(feeds)]
    position = 0
    for level in unet.up_blocks:
        position += len(level.resnets)
        if level.upsamplers and position < len(feeds):
            handles.append(level.upsamplers[0].register_forward_pre_hook(upsampling(position)))
    with while_hooked(handles):
        yield
