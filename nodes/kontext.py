"""Edit models (FLUX.1 Kontext) with ComfyUI's nodes: ReferenceLatent,
FluxKontextMultiReferenceLatentMethod, FluxKontextImageScale.

An edit model reads reference images beside the latent it denoises; ComfyUI's graph
for it is LoadImage -> FluxKontextImageScale -> VAEEncode -> ReferenceLatent
(on the prompt's conditioning) -> FluxGuidance -> KSampler. These nodes only put the
references on the CONDITIONING; how the network reads them (tokens, position ids,
the layouts for several references) is nodes.families.flux_references.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.conditioning_nodes import COND, _entries
from nodes.families import flux_references

#: The image sizes (width, height) FLUX.1 Kontext was trained on, about one megapixel each
#: (Black Forest Labs' list, as ComfyUI and diffusers' FluxKontextPipeline use it).
KONTEXT_SIZES = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                 (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                 (1456, 720), (1504, 688), (1568, 672))
#: ComfyUI's choices; "uxo/uno" selects the layout its model code calls "uxo".
#: "index_timestep_zero" (Qwen-Image-Edit, FLUX.2: references modulated at time 0) is accepted so
#: those workflows load, and refused when a FLUX.1 model samples (flux_references.for_call).
METHOD_CHOICES = ["offset", "index", "uxo/uno", "index_timestep_zero"]


@define_node(
    "ReferenceLatent",
    category="advanced/conditioning/edit_models",
    inputs=[Input("conditioning", T.CONDITIONING),
            Input("latent", T.LATENT, optional=True,
                  tooltip="The reference image's latent (VAEEncode); chain the node to add several")],
    outputs=COND,
)
def reference_latent(ctx, conditioning: Any, latent: Any = None):
    """Append an image's latent to every entry's reference latents, for an edit model to read
    (without a latent the conditioning passes unchanged, as in ComfyUI)."""
    if latent is None:
        return (_entries(conditioning, "conditioning"),)
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if getattr(samples, "ndim", None) != 4:
        raise NodeError("is not a LATENT of images ({'samples': [batch, channels, h, w]})", "latent")
    out = _entries(conditioning, "conditioning")
    for _, extra in out:
        extra[flux_references.LATENTS] = [*extra.get(flux_references.LATENTS, ()), samples]
    return (out,)


@define_node(
    "FluxKontextMultiReferenceLatentMethod",
    category="advanced/conditioning/flux",
    inputs=[Input("conditioning", T.CONDITIONING),
            Input("reference_latents_method", T.COMBO, choices=METHOD_CHOICES,
                  tooltip="Where several reference images sit in the model's position grid: offset (side by "
                          "side), index (one index each) or uxo/uno (past the image, diagonally)")],
    outputs=COND,
)
def flux_kontext_multi_reference_latent_method(ctx, conditioning: Any, reference_latents_method: str):
    """Choose how several reference latents are laid out (one reference: every choice is the same
    except uxo/uno)."""
    if reference_latents_method not in METHOD_CHOICES:
        raise NodeError(f"must be one of {', '.join(METHOD_CHOICES)}, got {reference_latents_method!r}",
                        "reference_latents_method")
    method = "uxo" if reference_latents_method == "uxo/uno" else reference_latents_method
    out = _entries(conditioning, "conditioning")
    for _, extra in out:
        extra[flux_references.METHOD] = method
    return (out,)


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The trained size (width, height) whose aspect ratio is nearest the image's (the first on a tie)."""
    ratio = width / height
    return min(KONTEXT_SIZES, key=lambda size: abs(ratio - size[0] / size[1]))


@define_node(
    "FluxKontextImageScale",
    category="advanced/conditioning/flux",
    inputs=[Input("image", T.IMAGE)],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def flux_kontext_image_scale(ctx, image: Any):
    """Resize to the trained size nearest in aspect ratio (Lanczos, the excess cut around the centre),
    the size FLUX.1 Kontext edits best at."""
    from nodes.image_ops import _scaled
    from nodes.masking import as_image

    image = as_image(image)
    width, height = kontext_size(int(image.shape[2]), int(image.shape[1]))
    return (_scaled(ctx, image, width, height, "lanczos", "center"),)
