"""VAEEncode and VAEDecode: IMAGE <-> LATENT through the checkpoint's (or a loaded) VAE.

LATENT samples are unscaled (raw VAE space, as in ComfyUI); the MODEL applies its
latent scale inside sampling. The VAE works on sizes that are multiples of 8, and
VAEEncode never crops silently: its ``size_rule`` input says what happens to
other sizes, and the node reports what it did.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.budget import Size
from engine.node import Batch, Input, Output, Result, define_node
from nodes.handles import VaeHandle
from nodes.image import resize_pixels, round_to_multiple

SIZE_RULES = ["resize", "reject", "crop"]
MIN_SIDE = 8


def target_size(height: int, width: int, multiple: int = 8) -> tuple[int, int]:
    """The nearest multiple of ``multiple`` for each side (ImageResize's rounding rule)."""
    return round_to_multiple(height, multiple), round_to_multiple(width, multiple)


def _check_vae(vae: Any) -> VaeHandle:
    if not isinstance(vae, VaeHandle):
        raise NodeError(f"vae must come from a checkpoint or VAE loader, got {type(vae).__name__}", input_name="vae")
    return vae


def fit_to_multiple(pixels: Any, multiple: int, rule: str) -> tuple[Any, str]:
    """Apply ``rule`` to an IMAGE whose sides are not multiples; returns (image, what was done)."""
    _, h, w, _ = pixels.shape
    if h % multiple == 0 and w % multiple == 0:
        return pixels, ""
    if rule == "reject":
        raise NodeError(f"the image is {w}x{h}; the VAE needs sides that are multiples of {multiple} "
                        f"(set size_rule to 'resize' or 'crop', or resize it first)", input_name="pixels")
    if rule == "crop":
        nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
        top, left = (h - nh) // 2, (w - nw) // 2
        return pixels[:, top:top + nh, left:left + nw, :], f"cropped {w}x{h} to {nw}x{nh} (centre)"
    nh, nw = target_size(h, w, multiple)
    return resize_pixels(pixels, nh, nw), f"resized {w}x{h} to {nw}x{nh} (nearest multiple of {multiple})"

#: Float32 elements per image pixel an SD-shaped VAE holds while it runs (its
#: 128-channel full-resolution activations), measured as the peak resident memory
#: of diffusers' AutoencoderKL on the CPU at 256 and 512 px (1010 to decode, 640 to
#: encode, the same at both sizes). The resource budget counts them at the node, so a decode far too
#: large for the host is refused before it starts and the tiled nodes suggested.
DECODE_ELEMENTS_PER_PIXEL = 1000.0
ENCODE_ELEMENTS_PER_PIXEL = 640.0


@define_node(
    "VAEEncode",
    category="latent",
    display_name="VAE Encode",
    inputs=[
        Input("pixels", T.IMAGE),
        Input("vae", T.VAE),
        Input("size_rule", T.COMBO, default="resize", choices=SIZE_RULES, optional=True,
              tooltip="Sides that are not multiples of 8: 'resize' (default) scales to the nearest "
                      "multiples of 8, 'reject' fails, 'crop' cuts the excess around the centre. "
                      "The node says which it did."),
    ],
    outputs=[Output("LATENT", T.LATENT)],
    size=Size(transient=ENCODE_ELEMENTS_PER_PIXEL),
)
def vae_encode(ctx, pixels, vae: VaeHandle, size_rule: str = "resize"):
    """Encode an image to latents: the VAE posterior's mean (deterministic, unscaled).

    Unlike ComfyUI, a size that is not a multiple of 8 is never cropped silently;
    see ``size_rule``. Images smaller than 8x8 are refused.
    """
    import torch

    vae = _check_vae(vae)
    if size_rule not in SIZE_RULES:
        raise NodeError(f"size_rule must be one of {', '.join(SIZE_RULES)}", input_name="size_rule")
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] not in (1, 3, 4):
        raise NodeError("pixels must be an IMAGE [batch, height, width, channels]", input_name="pixels")
    b, h, w, c = pixels.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise NodeError(f"the image is {w}x{h}; VAEEncode needs at least {MIN_SIDE}x{MIN_SIDE} pixels",
                        input_name="pixels")
    if c == 1:
        pixels = pixels.expand(b, h, w, 3)
    pixels, done = fit_to_multiple(pixels.float(), vae.downscale, size_rule)
    samples = vae.encode(pixels[..., :3])
    if done:
        ctx.message(done)
        return Result(outputs=({"samples": samples},), ui={"text": [done]})
    return ({"samples": samples},)


def _vae_decode_batch(ctx, items, vae):
    """Queued jobs' latents of one shape decoded as one batch (the decoder works per image),
    each job's images split back out in order; None (decode per job) otherwise."""
    import torch

    latents = [item.get("samples") for item in items]
    if not all(isinstance(lat, dict) and isinstance(lat.get("samples"), torch.Tensor) and lat["samples"].ndim == 4
               for lat in latents) or len({tuple(lat["samples"].shape) for lat in latents}) != 1:
        return None
    (images,) = vae_decode(ctx, {"samples": torch.cat([lat["samples"] for lat in latents])}, vae)
    return [(part,) for part in images.split(latents[0]["samples"].shape[0])]


def _codes_video(vae: VaeHandle) -> bool:
    """Whether ``vae`` decodes a multi-frame latent as one video (Wan 2.1's VAE), not as pictures."""
    with vae.module() as module:
        return bool(getattr(module, "video", False))


@define_node(
    "VAEDecode",
    category="latent",
    display_name="VAE Decode",
    inputs=[Input("samples", T.LATENT), Input("vae", T.VAE)],
    outputs=[Output("IMAGE", T.IMAGE)],
    size=Size(transient=DECODE_ELEMENTS_PER_PIXEL),
    batch=Batch(vary=("samples",), run=_vae_decode_batch),
)
def vae_decode(ctx, samples, vae: VaeHandle):
    """Decode unscaled latents to an IMAGE (float32, 0..1, on the CPU)."""
    import torch

    from nodes.latent_layers import single_frames

    vae = _check_vae(vae)
    latent = samples.get("samples") if isinstance(samples, dict) else None
    if isinstance(latent, torch.Tensor) and latent.ndim == 5 and latent.shape[2] > 1 and _codes_video(vae):
        if latent.shape[1] != vae.latent_channels:
            raise NodeError(f"the latent has {latent.shape[1]} channels but this VAE expects {vae.latent_channels}",
                            input_name="samples")
        return (vae.decode_video(latent),)  # a video (Wan's): every frame, in order, as a batch
    if isinstance(latent, torch.Tensor):  # LatentCutToBatch's one-frame layers decode as images
        latent = single_frames(latent, "VAEDecode")
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        raise NodeError("samples must be a LATENT ({'samples': tensor [batch, channels, h, w]})",
                        input_name="samples")
    if latent.shape[1] != vae.latent_channels:
        raise NodeError(f"the latent has {latent.shape[1]} channels but this VAE expects {vae.latent_channels}",
                        input_name="samples")
    if not torch.isfinite(latent).all():
        raise NodeError("the latent holds NaN or infinite values: the sampler that made it diverged",
                        input_name="samples")
    note = getattr(vae, "compile_note", lambda: None)()
    if note:
        ctx.message(note)
    image = vae.decode(latent)
    if not torch.isfinite(image).all():  # a black image otherwise; float16 is the usual cause
        raise NodeError("the VAE decoded NaN or infinite pixels: VAEs can overflow in float16 (SDXL's does); "
                        "--precision bf16 or fp32 avoids it", input_name="vae")
    return (image,)
