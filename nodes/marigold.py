"""MarigoldV2PostProcess: a Marigold v2 prediction, decoded by the VAE, made into a picture.

Marigold v2 (ComfyUI's image_marigold_v2_*_estimation templates) fine-tunes Qwen-Image-Edit to
sample an image's depth, surface normals or albedo in one step (ModelSamplingAuraFlow's
``img_to_img_velocity``, nodes.samplers.velocity_rule). The VAE decodes the prediction as an
RGB image; what its channels mean depends on the prediction, and this node turns each into a
picture to look at:

* ``depth``: the channels' mean is the depth; each image is stretched to its own range, near
  bright: ``(max - d) / (max - min)`` (the range floored at 1e-6), grey in three channels.
* ``normals``: the channels hold a normal in 0..1 (``n * 0.5 + 0.5``); the vector is made unit
  length again (the decode need not keep it so) and mapped back to 0..1.
* ``albedo``: the prediction is linear light; the sRGB transfer function makes it a picture
  (12.92 x up to 0.0031308, ``1.055 x^(1/2.4) - 0.055`` above).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

if TYPE_CHECKING:
    import torch

PREDICTIONS = ("depth", "normals", "albedo")
#: The smallest depth range stretched to 0..1 (a flat prediction stays finite).
DEPTH_EPS = 1e-6


def depth_picture(image: "torch.Tensor") -> "torch.Tensor":
    """Each image's channel mean stretched to 0..1 over its own range, near (small depth) bright."""
    d = image.mean(dim=-1, keepdim=True)
    flat = d.reshape(d.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return ((hi - d) / (hi - lo).clamp_min(DEPTH_EPS)).expand(*d.shape[:3], 3).contiguous()


def normals_picture(image: "torch.Tensor") -> "torch.Tensor":
    """The 0..1 encoded normal made unit length (over the channels) and encoded again."""
    import torch

    return torch.nn.functional.normalize(image * 2.0 - 1.0, dim=-1) * 0.5 + 0.5


def albedo_picture(image: "torch.Tensor") -> "torch.Tensor":
    """Linear light -> sRGB (the standard's transfer function; negative values are the linear part's)."""
    import torch

    curve = 1.055 * image.clamp_min(0.0031308).pow(1.0 / 2.4) - 0.055
    return torch.where(image <= 0.0031308, image * 12.92, curve)


PICTURES = {"depth": depth_picture, "normals": normals_picture, "albedo": albedo_picture}


@define_node(
    "MarigoldV2PostProcess",
    category="image/geometry estimation",
    display_name="Marigold V2 Post-Process",
    inputs=[Input("image", T.IMAGE, tooltip="The decoded Marigold v2 prediction"),
            Input("prediction", T.COMBO, choices=list(PREDICTIONS), default="depth",
                  tooltip="What the model predicted: depth, surface normals or albedo")],
    outputs=[Output("IMAGE", T.IMAGE)],
)
def marigold_v2_post_process(ctx, image, prediction: str = "depth"):
    """Turn a decoded Marigold v2 prediction into a picture (see the module docstring)."""
    import torch

    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise NodeError("expected an IMAGE [B, H, W, 3]", "image")
    if prediction not in PICTURES:
        raise NodeError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}", "prediction")
    return (PICTURES[prediction](image[..., :3].to(torch.float32)),)
