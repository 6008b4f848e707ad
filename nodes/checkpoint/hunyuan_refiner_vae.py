"""The HunyuanImage 2.1 refiner's VAE (VAELoader): diffusers' ``AutoencoderKLHunyuanImageRefiner`` (a causal
video VAE, 32 channels, 16x) behind the image-VAE surface Kiln's VAE nodes use.

A picture is one frame. The refiner samples the frame repeated in front and both frames' channels stacked
(nodes.families.hunyuan_image_refiner), so :class:`RefinerFrameVAE` encodes to that stacked layout,
[B, 64, h, w] = [raw, raw] (the posterior mean), and decodes the second half, as the pipeline's
``_restore_image_tokens_order`` keeps it. Read from diffusers' names in one file; the shapes give the config; a
key that does not fit fails naming the file and the key. The same tensors in Tencent's names (``*.conv.conv``,
``mid.attn_1``) are HunyuanVideo 1.5's VAE file, as ComfyUI tells them (nodes.checkpoint.hunyuan_video15_load,
which reads them with :func:`to_diffusers` and :func:`vae_config`); the refiner's released VAE has plain
convolutions, which Kiln does not read.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from nodes.checkpoint.wrapped_vae import OneFrameVAE

LABEL = "HunyuanImage 2.1 refiner VAE"
#: Pixels per latent cell.
DOWNSCALE = 16


def is_refiner_vae(shapes: Mapping[str, tuple]) -> bool:
    """The refiner VAE in either layout: causal 3-D convolutions (``conv.conv``) and the mid attention."""
    conv = shapes.get("decoder.conv_in.conv.weight")
    attention = any(k in shapes for k in ("decoder.mid_block.attentions.0.proj_out.weight",
                                          "decoder.mid.attn_1.proj_out.weight"))
    return conv is not None and len(conv) == 5 and attention


#: Tencent's names -> diffusers' (whole-name prefixes; the rest of each name is the same in both).
_RENAMES = (
    (r"^(encoder)\.down\.(\d+)\.block\.(\d+)\.", r"\1.down_blocks.\2.resnets.\3."),
    (r"^(encoder)\.down\.(\d+)\.downsample\.", r"\1.down_blocks.\2.downsamplers.0."),
    (r"^(decoder)\.up\.(\d+)\.block\.(\d+)\.", r"\1.up_blocks.\2.resnets.\3."),
    (r"^(decoder)\.up\.(\d+)\.upsample\.", r"\1.up_blocks.\2.upsamplers.0."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.([qkv])\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
)


def to_diffusers(state: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' names for Tencent's refiner VAE layout (``encoder.down.N.block.M``, ``down.N.downsample``,
    ``mid.block_1``, ``mid.attn_1.q``; the facts of diffusers' conversion script); diffusers' names pass."""
    out = {}
    for k, v in state.items():
        for pattern, repl in _RENAMES:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v
    return out


def vae_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """AutoencoderKLHunyuanImageRefiner arguments from the shapes: each level's width from its first resnet,
    resnets per level from level 0, a spatial halving per downsampler, a temporal one where a downsampler's
    convolution folds 8 cells (2x2x2) instead of 4."""
    levels = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
    widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in levels]
    layers = len({m.group(1) for k in shapes
                  for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    spatial, temporal = 1, 1
    for i in levels:
        conv = shapes.get(f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight")
        if conv is None:
            continue
        spatial *= 2
        if widths[i + 1] // conv[0] == 8:
            temporal *= 2
    return dict(in_channels=shapes["encoder.conv_in.conv.weight"][1],
                out_channels=shapes["decoder.conv_out.conv.weight"][0],
                latent_channels=shapes["decoder.conv_in.conv.weight"][1], block_out_channels=tuple(widths),
                layers_per_block=layers, spatial_compression_ratio=spatial, temporal_compression_ratio=temporal)


class RefinerFrameVAE(OneFrameVAE):
    """The refiner VAE coding pictures as one frame, in the refiner's stacked latent layout (module docstring)."""

    kiln_downscale = DOWNSCALE

    def __init__(self, vae: Any) -> None:
        super().__init__(vae, latent_channels=2 * int(vae.config.latent_channels), shift_factor=None)

    def picture_latent(self, frame: torch.Tensor) -> torch.Tensor:
        """The frame's latent [B, 32, h, w] stacked twice: [B, 64, h, w] (the module docstring's layout)."""
        return torch.cat([frame] * 2, dim=1)

    def frame_latent(self, z: torch.Tensor) -> torch.Tensor:
        """A stacked latent's second frame, the one the refiner decodes."""
        return z[:, z.shape[1] // 2:]


def build_vae(state: Mapping[str, Any], what: str, dtype: Any) -> RefinerFrameVAE:
    """The VAE from diffusers' names; a key that does not fit names the file."""
    from diffusers import AutoencoderKLHunyuanImageRefiner

    return build_layout(state, what, dtype, AutoencoderKLHunyuanImageRefiner, RefinerFrameVAE, LABEL)


def build_layout(state: Mapping[str, Any], what: str, dtype: Any, vae_class: Any, wrapper: Any, label: str) -> Any:
    """A VAE of this layout (the refiner's, and HunyuanVideo 1.5's, which shares it:
    nodes.checkpoint.hunyuan_video15_load) as ``vae_class`` behind ``wrapper``: renamed, its config from the
    shapes, frozen; a key that does not fit names the file and ``label``."""
    from nodes.checkpoint.load import CheckpointError, _assign, _empty
    from nodes.checkpoint.tensors import cast_view

    state = to_diffusers(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = vae_config(shapes)
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"{what}: not a complete {label} ({exc} is missing, in diffusers' names)") from None
    vae = _assign(_empty(vae_class, config), cast_view(dict(state), dtype), f"{label} ({what})", dtype)
    return wrapper(vae).eval().requires_grad_(False)
