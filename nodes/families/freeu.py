"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): in the UNet's decoder,
amplify half of the backbone features and damp the low frequencies of the skip features
before the two are joined, which trades texture noise for structure at no cost.

ComfyUI's FreeU and FreeU_V2 nodes choose the levels by the backbone's channel count: the
decoder resnets whose backbone input has 4x the base channels get (b1, s1), those with 2x
get (b2, s2). Kiln does the same on diffusers' UNets with a pre-hook on each decoder resnet,
whose input is the concatenation [backbone, skip]; the split point comes from the skip
channels the encoder hands that resnet. (diffusers' own ``enable_freeu`` picks levels by
block position instead, which differs from ComfyUI on SD1.5-shaped UNets.)

* v1 (FreeU): the first half of the backbone channels times b.
* v2 (FreeU_V2): that half times 1 + (b - 1) m, where m is the channel-mean map of the
  backbone scaled to [0, 1] per image, so the boost follows the features' own structure.
* both: the skip features' centred low-frequency square (radius 1) in the 2-D Fourier
  domain times s.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from nodes.families.unet_network import unet_of
from nodes.runtime.compiled import while_hooked

if TYPE_CHECKING:
    import torch


def decoder_skips(unet: Any) -> list[tuple[Any, int]]:
    """Each decoder resnet with the skip channels it receives, in the decoder's order: the
    encoder's outputs (conv_in, every resnet, every downsampler) taken from the last."""
    skips = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        skips += [r.out_channels for r in block.resnets]
        skips += [d.out_channels for d in (block.downsamplers or [])]
    return [(resnet, skips.pop()) for block in unet.up_blocks for resnet in block.resnets]


def backbone(h: "torch.Tensor", b: float, version: str) -> "torch.Tensor":
    """The backbone features with their first half amplified (v1: by b; v2: by the normalised
    channel-mean map, between 1 and b)."""
    import torch

    half = h.shape[1] // 2
    if version == "v1":
        factor: Any = b
    else:
        mean = h.mean(1, keepdim=True)
        flat = mean.flatten(1)
        low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        factor = 1 + (b - 1) * (mean - low) / (high - low)
    return torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)


def low_frequencies_scaled(x: "torch.Tensor", scale: float, radius: int = 1) -> "torch.Tensor":
    """``x`` with its centred (2 radius) x (2 radius) Fourier square times ``scale``."""
    import torch

    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
    freq[..., rows - radius:rows + radius, cols - radius:cols + radius] *= scale
    out = torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


@contextlib.contextmanager
def applied(network: Any, settings: Any) -> Iterator[None]:
    """``network`` (a diffusers UNet) with FreeU's hooks while the block runs; nothing when
    ``settings`` is None."""
    if settings is None:
        yield
        return
    unet = unet_of(network, "FreeU")
    base = unet.conv_in.out_channels
    levels = {4 * base: (settings.b1, settings.s1), 2 * base: (settings.b2, settings.s2)}
    handles = []
    for resnet, skip in decoder_skips(unet):
        width = resnet.in_channels - skip
        if width not in levels:
            continue
        b, s = levels[width]

        def joined(module: Any, args: tuple, width: int = width, b: float = b, s: float = s) -> tuple:
            import torch

            x = args[0]
            h, hsp = x[:, :width], x[:, width:]
            return (torch.cat([backbone(h, b, settings.version), low_frequencies_scaled(hsp, s)], dim=1), *args[1:])

        handles.append(resnet.register_forward_pre_hook(joined))
    with while_hooked(handles):
        yield
