"""The Qwen-Image VAE (diffusers' AutoencoderKLQwenImage, the Wan 2.1 video VAE) on single images.

The VAE is causal 3-D: it takes [B, C, frames, H, W]. Kiln's VAE handle, VAE nodes and tiling
speak images ([B, C, H, W]), so :class:`FrameVAE` runs the VAE on one-frame videos behind the
image-VAE surface (``encode(x).latent_dist``, ``decode(z).sample``, ``config.latent_channels``).
ComfyUI's ``qwen_image_vae.safetensors`` keeps the original Wan layout (``encoder.downsamples.*``,
``decoder.upsamples.*``, ``conv1``/``conv2``); :func:`to_diffusers` renames it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from nodes.checkpoint.wrapped_vae import OneFrameVAE

#: A key only the Wan/Qwen-Image VAE has, in each layout (its causal 3-D residual blocks' RMS norms).
ORIGINAL_MARKER = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARKER = "decoder.mid_block.resnets.0.norm1.gamma"
_RES = {"residual.0.gamma": "norm1.gamma", "residual.2.": "conv1.", "residual.3.gamma": "norm2.gamma",
        "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
        "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
        "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
        "decoder.head.2.": "decoder.conv_out."}


def is_qwen_vae(keys: Any) -> bool:
    return ORIGINAL_MARKER in keys or DIFFUSERS_MARKER in keys


def _res(rest: str) -> str:
    for old, new in _RES.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _key_to_diffusers(key: str) -> str:
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"(encoder|decoder)\.middle\.(\d+)\.(.*)", key)
    if m:
        side, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if i == 1:
            return f"{side}.mid_block.attentions.0.{rest}"
        return f"{side}.mid_block.resnets.{i // 2}.{_res(rest)}"
    m = re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.{_res(m.group(2))}"
    m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if m:  # four per level: three res blocks, then the upsampler
        n = int(m.group(1))
        block, index = divmod(n, 4)
        if index == 3:
            return f"decoder.up_blocks.{block}.upsamplers.0.{m.group(2)}"
        return f"decoder.up_blocks.{block}.resnets.{index}.{_res(m.group(2))}"
    return key


def to_diffusers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Original (Wan) layout -> AutoencoderKLQwenImage's names; a diffusers-layout state passes as is."""
    if DIFFUSERS_MARKER in state:
        return dict(state)
    return {_key_to_diffusers(k): v for k, v in state.items()}


def _key_to_original(key: str) -> str:
    for old, new in _TOP.items():
        if key.startswith(new):
            return old + key[len(new):]
    res = {v: k for k, v in _RES.items()}

    def back(rest: str) -> str:
        for new, old in res.items():
            if rest.startswith(new):
                return old + rest[len(new):]
        return rest

    m = re.match(r"(encoder|decoder)\.mid_block\.(attentions|resnets)\.(\d+)\.(.*)", key)
    if m:
        side, kind, i, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        return f"{side}.middle.1.{rest}" if kind == "attentions" else f"{side}.middle.{2 * i}.{back(rest)}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{back(m.group(2))}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
    if m:
        block, index = int(m.group(1)), 3 if m.group(3) is None else int(m.group(3))
        return f"decoder.upsamples.{4 * block + index}.{back(m.group(4)) if index != 3 else m.group(4)}"
    return key


def to_original(state: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKLQwenImage's names -> the original (Wan) layout ComfyUI's file has."""
    return {_key_to_original(k): v for k, v in state.items()}


def config_from_shapes(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """AutoencoderKLQwenImage's config from diffusers-layout shapes (base width, latent channels,
    level widths, res blocks per level, temporal downsampling per level)."""
    base = shapes["encoder.conv_in.weight"][0]
    z_dim = shapes["decoder.conv_in.weight"][1]
    blocks = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
    widths, temporal, res_count, level_res = [], [], 0, []
    for b in blocks:
        if f"encoder.down_blocks.{b}.resample.1.weight" in shapes:
            temporal.append(f"encoder.down_blocks.{b}.time_conv.weight" in shapes)
            level_res.append(res_count)
            res_count = 0
        else:
            widths.append(shapes[f"encoder.down_blocks.{b}.conv1.weight"][0])
            res_count += 1
    num_res = max(level_res + [res_count])
    dim_mult = [w // base for w in widths[::num_res]]
    config = {"base_dim": base, "z_dim": z_dim, "dim_mult": dim_mult, "num_res_blocks": num_res,
              "temperal_downsample": temporal, "attn_scales": []}
    if shapes["encoder.conv_in.weight"][1] != 3:  # Qwen-Image-Layered's RGBA VAE codes 4 channels
        config["input_channels"] = shapes["encoder.conv_in.weight"][1]
    return config


class FrameVAE(OneFrameVAE):
    """An AutoencoderKLQwenImage behind the image-VAE surface (see the module docstring)."""

    def __init__(self, vae: Any) -> None:
        super().__init__(vae, latent_channels=int(vae.config.z_dim), scaling_factor=1.0, shift_factor=None)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        config = self.vae.config
        missing = int(getattr(config, "input_channels", getattr(config, "in_channels", 3))) - x.shape[1]
        if missing > 0:  # an RGBA VAE given RGB: opaque (alpha 1 is +1 in the VAE's range; ComfyUI pads so)
            x = torch.cat([x, torch.ones_like(x[:, :1]).expand(-1, missing, -1, -1)], dim=1)
        return super().encode(x)

    @property
    def video(self) -> bool:
        """Whether it codes videos (Wan's path: frames [B, 3, 1 + 4k, H, W] <-> latents [B, C, 1 + k, h, w],
        its causal time axis): the RGB VAE; Qwen-Image-Layered's RGBA one codes its layers as pictures."""
        config = self.vae.config
        return int(getattr(config, "input_channels", getattr(config, "in_channels", 3))) == 3

    def encode_video(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean of a video [B, 3, frames, H, W] in -1..1 (Wan image-to-video's condition)."""
        return self.vae.encode(x).latent_dist.mean

    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """A video [B, 3, frames, H, W] in -1..1 from latents [B, C, latent frames, h, w]."""
        return self.vae.decode(z, return_dict=False)[0]


def build(state: Mapping[str, Any], what: str, dtype: Any) -> FrameVAE:
    """The VAE from either layout's tensors; a layout mismatch names the family and the keys."""
    from diffusers import AutoencoderKLQwenImage

    from nodes.checkpoint.load import CheckpointError, _assign, _empty

    original = DIFFUSERS_MARKER not in state
    state = to_diffusers(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = config_from_shapes(shapes)
    except (KeyError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{what}: not a complete Qwen-Image (Wan 2.1) VAE ({exc} is missing)") from None
    vae = _empty(AutoencoderKLQwenImage, config)
    try:
        vae = _assign(vae, state, "Qwen-Image VAE", dtype,
                      file_names=(lambda names: [_key_to_original(n) for n in names]) if original else None)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    return FrameVAE(vae).eval().requires_grad_(False)
