"""Latent nodes: EmptyLatentImage (text to image) and AddNoise (image-to-image strength).

AddNoise does not mix noise into the latent itself. The noise level that a
strength means depends on the sampler's schedule (which AddNoise cannot know), so
AddNoise records the clean latent, the seeded noise and the strength, and KSampler
forms the noisy latent at its own first step. That keeps AddNoise a real node (its
output is cached; changing only the seed re-runs AddNoise and what follows) while
the sampler still lands exactly on diffusers' img2img grid. The strength rule and
Stability's ``start_schedule`` mapping are documented in
``nodes/samplers/plan.py``.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Batch, Input, Output, define_node
from nodes.latent_ops import EMPTY_LATENT_SIZE, empty_latent_inputs

MAX_SEED = 0xFFFFFFFFFFFFFFFF
LATENT_CHANNELS = 4


def image_seeds(seed: int, batch: int, batch_index: Any = None) -> list[int]:
    """The seed of each image of a batch: ``seed + i`` (or ``seed + batch_index[i]``).

    Each image thus equals a single run with its own seed, whatever the batch size.
    Seeds wrap at 2**64, the range torch generators accept.
    """
    offsets = list(batch_index) if batch_index is not None else list(range(batch))
    if len(offsets) != batch:
        offsets = list(range(batch))
    return [(int(seed) + int(k)) % (MAX_SEED + 1) for k in offsets]


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> Any:
    """Gaussian noise [B, ...] drawn on the CPU, image i from a generator seeded ``seeds[i]``.

    Drawing on the CPU makes a seed give the same noise on any device.
    """
    import torch

    draws = []
    for s in seeds:
        gen = torch.Generator("cpu").manual_seed(s)
        draws.append(torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float32))
    return torch.cat(draws)


@define_node(
    "EmptyLatentImage",
    category="latent",
    display_name="Empty Latent Image",
    inputs=empty_latent_inputs(8, default=512),
    outputs=[Output("LATENT", T.LATENT)],
    size=EMPTY_LATENT_SIZE,
)
def empty_latent_image(ctx, width: int, height: int, batch_size: int = 1):
    """A blank latent to sample an image from text: zeros [batch, 4, height/8, width/8]."""
    import torch

    w, h = int(width) // 8 * 8, int(height) // 8 * 8
    if (w, h) != (int(width), int(height)):
        ctx.message(f"{width}x{height} is not a multiple of 8: the latent is for {w}x{h} pixels")
    return ({"samples": torch.zeros([int(batch_size), LATENT_CHANNELS, h // 8, w // 8])},)


def _add_noise_batch(ctx, items, model, latent=None, strength: float = 0.75):
    """Queued jobs differing in AddNoise's seed or input latent (their own input images): each
    job's own noise on its own latent (cheap; declared so that their samplers, which then
    differ only in seed and latent, can share one batch)."""
    return [add_noise(ctx, model, item.get("latent", latent), strength, item["seed"]) for item in items]


def widen_empty(samples: "Any", channels: int, downscale: int = 8) -> "Any":
    """ComfyUI's rule for an empty latent of another channel count (EmptyLatentImage's 4 channels in a
    FLUX, Qwen-Image or Krea 2 template): zeros of the model's ``channels``; any other latent as it is.
    ``downscale``: the model's pixels per latent cell; EmptyLatentImage's 4-channel latent counts 8, so
    for another ratio (Qwen-Image 2.1's 16) its size is rescaled too, as ComfyUI's KSampler does."""
    import torch

    if not channels or samples.shape[1] == channels or bool(torch.count_nonzero(samples)):
        return samples
    h, w = samples.shape[2:]
    if downscale != 8 and samples.shape[1] == LATENT_CHANNELS:
        h, w = round(h * 8 / downscale), round(w * 8 / downscale)
    return torch.zeros((samples.shape[0], channels, h, w), dtype=samples.dtype)


@define_node(
    "AddNoise",
    category="latent",
    display_name="Add Noise (strength)",
    inputs=[
        Input("model", T.MODEL),
        Input("latent", T.LATENT),
        Input("strength", T.FLOAT, default=0.75, min=0.0, max=1.0, step=0.01, extra={"display": "slider"},
              tooltip="How much of the image is repainted: 0 keeps it, 1 starts from noise"),
        Input("seed", T.INT, default=0, min=0, max=MAX_SEED, control_after_generate=True,
              tooltip="Image i of a batch uses seed + i"),
    ],
    outputs=[Output("LATENT", T.LATENT)],
    batch=Batch(vary=("seed", "latent"), run=_add_noise_batch),
)
def add_noise(ctx, model, latent, strength: float = 0.75, seed: int = 0):
    """Mark a latent for image-to-image: record the strength and draw its seeded noise.

    KSampler then runs int(steps * strength) of its steps, starting from this
    latent noised to the matching level (diffusers' / A1111's strength rule).
    """
    import torch

    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise NodeError("expected a LATENT (a dict with 'samples')", "latent")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise NodeError(f"latent samples must be [B, C, h, w], got shape {tuple(samples.shape)}", "latent")
    channels = getattr(model, "latent_channels", samples.shape[1])
    if samples.shape[1] != channels:
        raise NodeError(f"the latent has {samples.shape[1]} channels but the model expects {channels}", "latent")
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise NodeError(f"strength must be a number, got {strength!r}", "strength") from None
    if not 0.0 <= strength <= 1.0:
        raise NodeError(f"strength must be within 0..1, got {strength}", "strength")
    seeds = image_seeds(seed, samples.shape[0], latent.get("batch_index"))
    out = dict(latent)
    out.update({"noise": seeded_noise(tuple(samples.shape), seeds), "strength": strength, "seed": int(seed)})
    return (out,)
