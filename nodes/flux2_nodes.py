"""FLUX.2 nodes with ComfyUI's names and inputs: EmptyFlux2LatentImage, Flux2Scheduler and FluxKVCache.

The family (network, text, VAE latent, flow shift) is nodes.families.flux2; these nodes make
what ComfyUI's make: a blank 128-channel patch latent at 1/16 of the image, the sigma list
of FLUX.2's empirical shift for a given size and step count, and a MODEL that caches its
reference images' keys and values within a run (nodes.families.reference_kv).
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.families.flux2 import DOWNSCALE, FLUX2_LATENT
from nodes.latent_ops import EMPTY_LATENT_SIZE, MAX_RESOLUTION, empty_latent_inputs


@define_node(
    "EmptyFlux2LatentImage",
    category="latent",
    display_name="Empty Flux 2 Latent",
    inputs=empty_latent_inputs(16),
    outputs=[Output("LATENT", T.LATENT)],
    size=EMPTY_LATENT_SIZE,
)
def empty_flux2_latent_image(ctx, width: int = 1024, height: int = 1024, batch_size: int = 1):
    """A blank FLUX.2 latent: zeros [batch, 128, height/16, width/16] (the VAE's 2x2 patches of its
    32 channels; sizes round down to 16 pixels, as ComfyUI's)."""
    import torch

    for name, value in (("width", width), ("height", height)):
        if int(value) < DOWNSCALE:
            raise NodeError(f"{name} must be at least {DOWNSCALE} pixels, got {value}", name)
    shape = [int(batch_size), FLUX2_LATENT.channels, int(height) // DOWNSCALE, int(width) // DOWNSCALE]
    return ({"samples": torch.zeros(shape)},)


def flux2_sigmas(steps: int, width: int, height: int) -> "torch.Tensor":  # noqa: F821
    """``steps + 1`` flow times from 1 to 0: ``linspace(1, 0, steps + 1)`` shifted by
    ``exp(mu) / (exp(mu) + 1/t - 1)`` at FLUX.2's empirical mu for ``width * height / 16^2``
    tokens and ``steps`` (the grid Flux2KleinPipeline samples on, with its final 0)."""
    import math

    import torch

    from nodes.samplers.flow import empirical_mu

    mu = empirical_mu(round(width * height / (DOWNSCALE * DOWNSCALE)), steps)
    t = torch.linspace(1, 0, steps + 1)
    with torch.no_grad():
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


@define_node(
    "Flux2Scheduler",
    category="sampling/custom_sampling/schedulers",
    inputs=[
        Input("steps", T.INT, default=20, min=1, max=4096),
        Input("width", T.INT, default=1024, min=16, max=MAX_RESOLUTION, step=1),
        Input("height", T.INT, default=1024, min=16, max=MAX_RESOLUTION, step=1),
    ],
    outputs=[Output("SIGMAS", T.SIGMAS)],
)
def flux2_scheduler(ctx, steps: int, width: int, height: int):
    """FLUX.2's sigmas for an image of ``width`` x ``height`` pixels (see :func:`flux2_sigmas`)."""
    for name, value, low in (("steps", steps, 1), ("width", width, 16), ("height", height, 16)):
        if int(value) < low:
            raise NodeError(f"{name} must be at least {low}, got {value}", name)
    return (flux2_sigmas(int(steps), int(width), int(height)),)


@define_node(
    "FluxKVCache",
    category="advanced/model",
    display_name="Flux KV Cache",
    inputs=[Input("model", T.MODEL, tooltip="The model to use KV Cache on.")],
    outputs=[Output("MODEL", T.MODEL, tooltip="The patched model with KV Cache enabled.")],
)
def flux_kv_cache(ctx, model):
    """The model with its reference images' keys and values computed at the first network call of
    each run and reused after (nodes.families.reference_kv): FLUX.2 [klein] KV's edit, faster by
    the references' share of the tokens, and on FLUX.2 [dev] as ComfyUI's node patches any FLUX.2
    (both run one network; [dev]'s references are modulated at time 0 with the run's guidance).
    The handle given samples as before."""
    import dataclasses

    from nodes.families.flux2 import Flux2
    from nodes.handles import ModelHandle

    if not isinstance(model, ModelHandle):
        raise NodeError(f"model must be a MODEL, got {type(model).__name__}", "model")
    if not isinstance(model.family, Flux2):
        raise NodeError(f"FluxKVCache caches the reference images of FLUX.2 ([klein] or [dev]), through the FLUX.2 "
                        f"transformer's key/value path (diffusers' Flux2 KV processors), which other networks lack; "
                        f"this model is {model.family.name}", "model")
    return (dataclasses.replace(model, patches=dataclasses.replace(model.patches, reference_kv=True)),)
