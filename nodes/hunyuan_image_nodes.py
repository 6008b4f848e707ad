"""HunyuanImage 2.1's own nodes with ComfyUI's names and inputs: EmptyHunyuanImageLatent and the refiner's
HunyuanRefinerLatent.

The family (network, text encoding, flow sampling) is nodes.families.hunyuan_image; this node gives the
empty latent ComfyUI's does: 64 channels, one cell per 32 pixels (the VAE's compression), default 2048 x
2048, sizes in steps of 32.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.families.hunyuan_image import HUNYUAN_IMAGE_LATENT, REFINER_TEXT
from nodes.families.hunyuan_image_refiner import REFINER_LATENT as REFINER

from nodes.latent_ops import EMPTY_LATENT_SIZE, empty_latent_inputs
#: Pixels per latent cell and the latent's channels.
MULTIPLE, CHANNELS = HUNYUAN_IMAGE_LATENT.downscale, HUNYUAN_IMAGE_LATENT.channels


@define_node(
    "EmptyHunyuanImageLatent",
    category="latent",
    inputs=empty_latent_inputs(32, default=2048, least=64),
    outputs=[Output("LATENT", T.LATENT)],
    size=EMPTY_LATENT_SIZE,
)
def empty_hunyuan_image_latent(ctx, width: int = 2048, height: int = 2048, batch_size: int = 1):
    """A blank HunyuanImage 2.1 latent: zeros [batch, 64, height/32, width/32]. A size that is not a
    multiple of 32 is refused naming the input (the VAE's cells are 32 pixels; ComfyUI would floor it)."""
    import torch

    for name, value in (("width", width), ("height", height)):
        if int(value) % MULTIPLE:
            raise NodeError(f"{name} {value} is not a multiple of {MULTIPLE}: HunyuanImage 2.1's VAE makes one latent "
                            f"cell per {MULTIPLE}x{MULTIPLE} pixels (try {int(value) // MULTIPLE * MULTIPLE})", name)
    return ({"samples": torch.zeros([int(batch_size), CHANNELS, int(height) // MULTIPLE, int(width) // MULTIPLE])},)


@define_node(
    "HunyuanRefinerLatent",
    category="conditioning/video_models",
    inputs=[
        Input("positive", T.CONDITIONING),
        Input("negative", T.CONDITIONING),
        Input("latent", T.LATENT),
        Input("noise_augmentation", T.FLOAT, default=0.10, min=0.0, max=1.0, step=0.01),
    ],
    outputs=[Output("positive", T.CONDITIONING), Output("negative", T.CONDITIONING), Output("latent", T.LATENT)],
)
def hunyuan_refiner_latent(ctx, positive, negative, latent, noise_augmentation: float = 0.10):
    """ComfyUI's HunyuanRefinerLatent: the picture to refine (the refiner VAE's latent, VAEEncode's) goes on
    both prompts as ``concat_latent_image`` with its ``noise_augmentation`` (the refiner family blends
    them when sampling: nodes.families.hunyuan_image_refiner; diffusers' pipeline uses 0.25), each prompt's
    text in the refiner's template (``hunyuan_refiner_text``, which CLIPTextEncode made beside the base
    template's) in place of the base template's, and an empty
    latent of its size is what KSampler samples. ComfyUI's empty latent is the 5-D raw [B, 32, 1, h, w];
    Kiln's is the refiner's stacked [B, 64, h, w] (its VAE's layout), zeros either way."""
    import torch

    from nodes.conditioning_nodes import _entries

    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != REFINER.channels:
        raise NodeError(f"latent must be the HunyuanImage 2.1 refiner VAE's latent [B, {REFINER.channels}, h, w] "
                        "(VAEEncode with the refiner's VAE)", "latent")
    values = {"concat_latent_image": samples, "noise_augmentation": float(noise_augmentation)}
    pos, neg = _entries(positive, "positive"), _entries(negative, "negative")

    def refined(entries: list) -> list:
        """Each entry with the picture, its text in the refiner's template where CLIPTextEncode made it."""
        return [[x.get(REFINER_TEXT, e), {k: v for k, v in x.items() if k != REFINER_TEXT} | values]
                for e, x in entries]

    return refined(pos), refined(neg), {"samples": torch.zeros_like(samples)}
