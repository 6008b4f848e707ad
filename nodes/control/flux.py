"""FLUX.1 ControlNets (InstantX's and Shakker-Labs' files, diffusers' ``FluxControlNetModel``).

Such a ControlNet is a short FLUX transformer that reads the hint as VAE latents: the
hint image is brought to the latent's pixel size (ComfyUI's resize rule), encoded with
the apply node's VAE (the posterior mean, as ComfyUI encodes), shifted/scaled into model
space and packed into 2x2 patch tokens, as diffusers' FluxControlNetPipeline prepares
``controlnet_cond``; an inpainting ControlNet's kept mask is appended before packing, as
AliMama's pipeline packs it (nodes/control/inpaint.py). Each network call runs it on the same
tokens, time, guidance (when it has a guidance embedder), pooled text, prompt and position ids
as the transformer;
its per-block outputs times the strength are added after the transformer's blocks.

A ControlNet has fewer blocks than the transformer; its outputs are spread over the
transformer's blocks here (output i serves ceil(N / n) consecutive blocks, ComfyUI's and
diffusers' rule), so ControlNets of different depths stack by adding block by block.

A union ControlNet (``num_mode``) takes the control type as one extra prompt token
(SetUnionControlNetType); with no type set ("auto") it runs without that token, as
ComfyUI runs it.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

BLOCKS = "controlnet_block_samples"
SINGLE_BLOCKS = "controlnet_single_block_samples"


def hint_tokens(link: Any, rows: int, h: int, w: int, latent: Any, device: Any, dtype: Any) -> "torch.Tensor":
    """The hint as packed model-space latent tokens [rows, (h/2)(w/2), 64], encoded once per size."""
    from nodes.control.apply import latent_hint, to_rows
    from nodes.control.inpaint import extra_channels, with_mask
    from nodes.families.flux import pack

    key = ("flux-packed", h, w)
    if key not in link.cache:
        hint = with_mask(link, latent_hint(link, h, w, latent.to_model, "FLUX"), extra_channels(link.net.config))
        link.cache[key] = pack(hint)
    return to_rows(link.cache[key], rows).to(device, dtype)


def spread(samples: Any, blocks: int) -> list:
    """``samples`` over ``blocks`` transformer blocks: each serves ceil(blocks / n) in turn."""
    if not samples:
        return []
    every = math.ceil(blocks / len(samples))
    return [samples[i // every] for i in range(blocks)]


#: Held around every call of a union ControlNet: "auto" switches the shared module's mode token off.
_UNION_CALLS = threading.Lock()


@contextlib.contextmanager
def _mode_token(network: Any, mode: int | None) -> Iterator[None]:
    """Run a union ControlNet without its mode token when no type is set (ComfyUI's "auto"):
    diffusers' model insists on a mode, ComfyUI's skips the token. Union calls take turns, so
    another job's typed call never sees the token switched off."""
    if network.config.get("num_mode") is None:
        yield
        return
    with _UNION_CALLS:
        network.union = mode is not None
        try:
            yield
        finally:
            network.union = True


def run(network: Any, link: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict,
        model_config: Any, latent: Any) -> dict[str, list]:
    """One FLUX ControlNet's block and single-block samples for rows ``x`` [B, 16, h, w], spread
    over the model's blocks, float32."""
    import torch

    from nodes.families.flux import DEFAULT_GUIDANCE, image_ids, pack, without_guidance

    b, _, h, w = x.shape
    dtype, device = network.dtype, x.device
    mode = link.net.mode
    extra: dict[str, Any] = {"pooled_projections": kwargs["pooled_projections"].to(dtype)}
    if network.config.guidance_embeds:
        guidance = kwargs.get("guidance")
        if guidance is None:  # [schnell] has no guidance input; its conditioning's default goes in
            guidance = torch.full((b,), DEFAULT_GUIDANCE, device=device)
        extra["guidance"] = guidance.to(dtype)
    if mode is not None and network.config.get("num_mode") is not None:
        extra["controlnet_mode"] = torch.full((b, 1), int(mode), device=device, dtype=torch.long)
    time = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(b) / 1000.0
    with _mode_token(network, mode), without_guidance(network, kwargs.get("guidance_off")):
        blocks, singles = network(hidden_states=pack(x).to(dtype), controlnet_cond=hint_tokens(
                                      link, b, h, w, latent, device, dtype),
                                  conditioning_scale=float(link.strength), timestep=time.to(dtype),
                                  encoder_hidden_states=context.to(dtype),
                                  txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
                                  img_ids=image_ids(h, w, device, dtype), return_dict=False, **extra)
    out = {}
    for key, samples, count in ((BLOCKS, blocks, model_config["num_layers"]),
                                (SINGLE_BLOCKS, singles, model_config["num_single_layers"])):
        if samples:  # diffusers gives None for a kind of block the ControlNet has none of
            out[key] = [s.to(torch.float32) for s in spread(samples, int(count))]
    return out


def inputs(totals: dict[str, list]) -> dict[str, Any]:
    """The transformer's keywords: one sample per double block (and per single block, if any)."""
    return {k: list(v) for k, v in totals.items()}
