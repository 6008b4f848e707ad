"""Resizing rules shared by the image, mask and latent nodes (ComfyUI's ``common_upscale``).

Tensors here are channel-first [B, C, H, W]. The methods are ComfyUI's, so a
ComfyUI workflow that upscales with "bislerp" or "lanczos" gets the same kind of
result: plain torch interpolation for "nearest-exact", "bilinear", "area" and
"bicubic" (align_corners off, no antialiasing, as ComfyUI calls it); Pillow's
Lanczos filter on 8-bit images for "lanczos"; and for "bislerp" a bilinear
interpolation that slerps between neighbouring latent vectors (their direction
is interpolated on the sphere, their length linearly), which keeps upscaled
latents from losing contrast.

The pixel budget lives here too: every node that makes a bigger image asks
:func:`check_pixel_budget` first, so no node allocates an image larger than the one
``settings.max_image_pixels`` lets LoadImage decode.
"""
from __future__ import annotations

from typing import Any

from engine.context import NodeError

IMAGE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LATENT_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]


def check_pixel_budget(env: Any, width: int, height: int, input_name: str, what: str = "the result") -> None:
    """Refuse a size beyond ``settings.max_image_pixels`` (the budget for one image)."""
    limit = int(env.settings.max_image_pixels)
    if width < 1 or height < 1:
        raise NodeError(f"{what} would be {width}x{height} pixels; both sides must be at least 1", input_name)
    if width * height > limit:
        raise NodeError(f"{what} would be {width}x{height} = {width * height} pixels, more than the budget of "
                        f"{limit} pixels for one image (settings.max_image_pixels)", input_name)


def centre_crop_to_aspect(x: Any, width: int, height: int) -> Any:
    """Cut the excess around the centre so that ``x`` has the aspect ratio width:height."""
    old_h, old_w = x.shape[-2], x.shape[-1]
    old_aspect, new_aspect = old_w / old_h, width / height
    left = top = 0
    if old_aspect > new_aspect:
        left = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        top = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x[..., top:old_h - top, left:old_w - left]


def resize(x: Any, width: int, height: int, method: str, crop: str = "disabled") -> Any:
    """``x`` [B, C, H, W] resized to height x width by ``method``; ``crop="center"`` keeps the aspect."""
    import torch.nn.functional as F

    if crop == "center":
        x = centre_crop_to_aspect(x, width, height)
    if method == "bislerp":
        return bislerp(x, width, height)
    if method == "lanczos":
        return lanczos(x, width, height)
    if method not in ("nearest-exact", "nearest", "bilinear", "area", "bicubic"):
        raise ValueError(f"unknown resize method {method!r}")
    return F.interpolate(x, size=(height, width), mode=method)


def lanczos(x: Any, width: int, height: int) -> Any:
    """Pillow's Lanczos filter, image by image, through 8-bit (as ComfyUI does)."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for item in x:
        arr = np.clip(np.rint(item.movedim(0, -1).cpu().float().numpy() * 255.0), 0, 255).astype(np.uint8)
        squeeze = arr.shape[-1] == 1
        im = Image.fromarray(arr[..., 0] if squeeze else arr)
        res = np.asarray(im.resize((width, height), resample=Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        if squeeze:
            res = res[..., None]
        out.append(torch.from_numpy(res).movedim(-1, 0))
    return torch.stack(out).to(x.device, x.dtype)


def _slerp(a: Any, b: Any, r: Any) -> Any:
    """Rows of ``a`` and ``b`` [N, C] interpolated by ``r`` [N, 1]: direction on the sphere, length linearly."""
    import torch

    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua = torch.where(na > 0, a / na.clamp_min(1e-12), torch.zeros_like(a))
    ub = torch.where(nb > 0, b / nb.clamp_min(1e-12), torch.zeros_like(b))
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    so = torch.where(safe, so, torch.ones_like(so))
    out = (torch.sin((1.0 - r) * omega) / so) * ua + (torch.sin(r * omega) / so) * ub
    out = out * (na * (1.0 - r) + nb * r)
    linear = a * (1.0 - r) + b * r
    # Parallel vectors (or a zero one): slerp degenerates, and linear interpolation is the limit.
    return torch.where(safe, out, linear)


def _neighbours(old: int, new: int, device: Any) -> tuple[Any, Any, Any]:
    """For each new position: the two source indices around it and the weight of the second."""
    import torch

    pos = (torch.arange(new, dtype=torch.float32, device=device) + 0.5) * (old / new) - 0.5
    pos = pos.clamp(0, old - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=old - 1)
    return lo, hi, (pos - lo).unsqueeze(-1)


def bislerp(x: Any, width: int, height: int) -> Any:
    """Bilinear resize of [B, C, H, W] whose 1-D steps slerp between the C-vectors of neighbours."""
    dtype = x.dtype
    x = x.float()
    b, c, h, w = x.shape
    lo, hi, r = _neighbours(w, width, x.device)  # along the width
    rows = x.movedim(1, -1)  # [B, H, W, C]
    a, bb = rows[:, :, lo, :].reshape(-1, c), rows[:, :, hi, :].reshape(-1, c)
    rr = r.expand(b, h, width, 1).reshape(-1, 1)
    rows = _slerp(a, bb, rr).reshape(b, h, width, c)
    lo, hi, r = _neighbours(h, height, x.device)  # along the height
    a, bb = rows[:, lo, :, :].reshape(-1, c), rows[:, hi, :, :].reshape(-1, c)
    rr = r.view(1, height, 1, 1).expand(b, height, width, 1).reshape(-1, 1)
    out = _slerp(a, bb, rr).reshape(b, height, width, c)
    return out.movedim(-1, 1).contiguous().to(dtype)
