"""Chroma1-Radiance's network: diffusers' Chroma trunk between Kiln's pixel patch embedder and NeRF head.

Chroma1-Radiance (lodestones) is Chroma working on pixels. Only the two ends differ from Chroma, so only
they are written here; the trunk (distilled guidance approximator, double and single blocks) is diffusers'
``ChromaTransformer2DModel`` with its latent ends taken off:

* **Patch embedder** (``img_in_patch``): a p x p convolution with stride p over the [-1, 1] pixels, i.e.
  one linear map of each patch's C*p*p values (channel, row, column order), giving one token a patch in
  row-major patch order. It replaces Chroma's ``img_in`` linear (diffusers' ``x_embedder``).
* **Trunk output**: the image tokens after the last single block, *without* Chroma's final modulated
  norm and projection (Radiance's model has no ``final_layer``), so diffusers' ``norm_out`` and
  ``proj_out`` are pass-throughs here.
* **NeRF head**, per patch, conditioned on that patch's final hidden state s:

  - ``nerf_image_embedder``: each pixel's C values joined with F*F cosine features of its place in the
    patch (x = column/(p-1), y = row/(p-1); feature (fx, fy), flattened fx-major, is
    cos(pi fx x) cos(pi fy y) / (1 + fx fy)), through one linear layer, computed in float32 (ComfyUI's
    ``nerf_embedder_dtype``).
  - ``nerf_blocks``: each makes a gated MLP's three weight matrices from s (``param_generator``: gate
    [h, h r], value [h, h r], out [h r, h], each row-major from its third of the output, each
    L2-normalised over its input dimension) and applies out(silu(gate(n)) * value(n)) + x to the
    RMS-normalised (``norm.scale``, eps 1e-6) pixel features n.
  - the pixel features put back in image layout, then ``nerf_final_layer_conv`` (RMS norm over the
    features, 3x3 convolution to C channels; the released files) or ``nerf_final_layer`` (RMS norm,
    linear; older files).

  The head runs ``tile`` patches at a time (ComfyUI's ``nerf_tile_size``, 0 = all): a memory knob only,
  each patch being independent of the others until the final layer.
* **Prediction**: files with the ``__x0__`` marker predict the clean image; the network returns the flow
  velocity anyway, (x - x0) / sigma, as ComfyUI's x0 mode does (its PR #11197: the ``use_x0`` empty buffer
  and the conversion after the head), so the samplers see a flow model.

The rules come from ComfyUI's comfy/ldm/chroma_radiance (read, not copied); no reference implementation
was run against this module (tests/test_chroma_radiance.py checks each part against the formulas above).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import ChromaTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from nodes.families.input_checks import pad_to_patches

#: ComfyUI's default NeRF tile (patches decoded at once), its model detection's value.
DEFAULT_TILE = 512
RMS_EPS = 1e-6


class ScaledRMSNorm(nn.Module):
    """RMS norm over the last dimension with a learnt ``scale`` (the original layout's name)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype), RMS_EPS)


def dct_features(patch: int, freqs: int, device: Any = None, dtype: Any = torch.float32) -> torch.Tensor:
    """[patch*patch, freqs*freqs]: the cosine features of each pixel place (see the module docstring)."""
    pos = torch.linspace(0, 1, patch, device=device, dtype=dtype)
    y, x = torch.meshgrid(pos, pos, indexing="ij")
    f = torch.arange(freqs, device=device, dtype=dtype)
    cx = torch.cos(torch.pi * x.reshape(-1, 1, 1) * f.view(1, -1, 1))
    cy = torch.cos(torch.pi * y.reshape(-1, 1, 1) * f.view(1, 1, -1))
    return (cx * cy / (1 + f.view(1, -1, 1) * f.view(1, 1, -1))).reshape(patch * patch, freqs * freqs)


class NerfEmbedder(nn.Module):
    """Pixel values plus their places' cosine features -> the head's pixel features (float32)."""

    def __init__(self, channels: int, width: int, freqs: int) -> None:
        super().__init__()
        self.freqs = freqs
        self.embedder = nn.Sequential(nn.Linear(channels + freqs * freqs, width))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, p*p, C] -> [N, p*p, width], in the input's dtype."""
        n, places, _ = pixels.shape
        patch = int(round(places ** 0.5))
        pos = dct_features(patch, self.freqs, pixels.device).expand(n, -1, -1)
        layer = self.embedder[0]
        x = torch.cat([pixels.float(), pos], dim=-1)
        out = torch.nn.functional.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())
        return out.to(pixels.dtype)


class NerfBlock(nn.Module):
    """A gated MLP whose weights a patch's hidden state generates (see the module docstring)."""

    def __init__(self, hidden: int, width: int, ratio: int) -> None:
        super().__init__()
        self.width, self.ratio = width, ratio
        self.param_generator = nn.Linear(hidden, 3 * width * width * ratio)
        self.norm = ScaledRMSNorm(width)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        n, w, r = x.shape[0], self.width, self.ratio
        gate, value, out = self.param_generator(s).chunk(3, dim=-1)
        normed = [torch.nn.functional.normalize(m, dim=-2) for m in
                  (gate.view(n, w, w * r), value.view(n, w, w * r), out.view(n, w * r, w))]
        h = self.norm(x)
        return torch.bmm(torch.nn.functional.silu(torch.bmm(h, normed[0])) * torch.bmm(h, normed[1]), normed[2]) + x


class NerfFinalConv(nn.Module):
    """RMS norm over the pixel features, then a 3x3 convolution to the image channels."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.norm = ScaledRMSNorm(width)
        self.conv = nn.Conv2d(width, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x.movedim(1, -1)).movedim(-1, 1))


class NerfFinalLinear(nn.Module):
    """RMS norm over the pixel features, then a per-pixel linear map to the image channels."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.norm = ScaledRMSNorm(width)
        self.linear = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x.movedim(1, -1))).movedim(-1, 1)


class _Unmodulated(nn.Module):
    """Stands for the trunk's final modulated norm, which Radiance's model does not have."""

    def forward(self, x: torch.Tensor, emb: Any = None) -> torch.Tensor:
        return x


def patch_ids(rows: int, cols: int, device: Any, dtype: Any) -> torch.Tensor:
    """[rows*cols, 3] rotary positions of the patch tokens: 0, row, column (FLUX's rule on the patch grid)."""
    r = torch.arange(rows, device=device, dtype=dtype).view(-1, 1).expand(rows, cols)
    c = torch.arange(cols, device=device, dtype=dtype).view(1, -1).expand(rows, cols)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3)


class ChromaRadianceTransformer(ModelMixin, ConfigMixin):
    """The whole Radiance network; ``trunk`` is diffusers' Chroma transformer (see the module docstring).
    ``trunk_config``: ChromaTransformer2DModel's arguments (its ``in_channels`` the hidden width, since
    its own embedder is replaced)."""

    @register_to_config
    def __init__(self, trunk_config: dict, channels: int = 3, patch_size: int = 16, nerf_hidden: int = 64,
                 nerf_depth: int = 4, nerf_mlp_ratio: int = 4, nerf_freqs: int = 8, head: str = "conv",
                 x0: bool = False, joint_attention_dim: int = 4096) -> None:
        super().__init__()
        self.trunk = ChromaTransformer2DModel(**trunk_config)
        self.trunk.x_embedder = nn.Identity()
        self.trunk.norm_out = _Unmodulated()
        self.trunk.proj_out = nn.Identity()
        hidden = self.trunk.inner_dim
        self.img_in_patch = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.nerf_image_embedder = NerfEmbedder(channels, nerf_hidden, nerf_freqs)
        self.nerf_blocks = nn.ModuleList(NerfBlock(hidden, nerf_hidden, nerf_mlp_ratio) for _ in range(nerf_depth))
        if head == "conv":
            self.nerf_final_layer_conv = NerfFinalConv(nerf_hidden, channels)
        elif head == "linear":
            self.nerf_final_layer = NerfFinalLinear(nerf_hidden, channels)
        else:
            raise ValueError(f"unknown Chroma1-Radiance head {head!r} (conv or linear)")
        self.tile = DEFAULT_TILE

    @property
    def final_layer(self) -> nn.Module:
        return self.nerf_final_layer_conv if self.config.head == "conv" else self.nerf_final_layer

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, patches, hidden] (row-major patch order)."""
        return self.img_in_patch(pixels).flatten(2).transpose(1, 2)

    def trunk_tokens(self, tokens: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, rows: int, cols: int,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's image tokens after its last block (diffusers' Chroma forward, latent ends removed)."""
        ids = patch_ids(rows, cols, tokens.device, tokens.dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=tokens.device, dtype=tokens.dtype)
        return self.trunk(hidden_states=tokens, timestep=sigma.to(tokens.dtype), encoder_hidden_states=context,
                          txt_ids=txt_ids, img_ids=ids, attention_mask=attention_mask, return_dict=False)[0]

    def head(self, pixels: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The NeRF head: pixels [B, C, H, W] and each patch's hidden state [B, patches, hidden] ->
        the network output [B, C, H, W]."""
        b, c, h, w = pixels.shape
        p = self.config.patch_size
        patches = hidden.shape[1]
        per_patch = torch.nn.functional.unfold(pixels, kernel_size=p, stride=p).transpose(1, 2)
        per_patch = per_patch.reshape(b * patches, c, p * p).transpose(1, 2)  # [N, p*p, C]
        states = hidden.reshape(b * patches, -1)
        step = self.tile if self.tile and self.tile > 0 else per_patch.shape[0]
        outs = []
        for i in range(0, per_patch.shape[0], step):
            x = self.nerf_image_embedder(per_patch[i:i + step])
            for block in self.nerf_blocks:
                x = block(x, states[i:i + step])
            outs.append(x)
        x = torch.cat(outs).transpose(1, 2).reshape(b, patches, -1).transpose(1, 2)
        x = torch.nn.functional.fold(x, output_size=(h, w), kernel_size=p, stride=p)
        return self.final_layer(x)

    def tokens_for(self, h: int, w: int) -> int:
        """The image token count at h x w pixels (the padded size's patches)."""
        p = self.config.patch_size
        return -(-h // p) * -(-w // p)

    def raw(self, pixels: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the file's network predicts (the clean image for x0 files, else the velocity). A size that is
        not a multiple of the patch is padded circularly at the bottom and right and the output cropped
        back, ComfyUI's rule (its ``pad_to_patch_size``)."""
        p = self.config.patch_size
        h, w = pixels.shape[-2:]
        pixels = pad_to_patches(pixels, p)
        rows, cols = pixels.shape[-2] // p, pixels.shape[-1] // p
        tokens = self.trunk_tokens(self.embed(pixels), sigma, context, rows, cols, attention_mask)
        return self.head(pixels, tokens)[..., :h, :w]

    def forward(self, pixels: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The flow velocity at noise level ``sigma`` [B] (0..1) for pixels [B, C, H, W] in [-1, 1]."""
        out = self.raw(pixels, sigma, context, attention_mask)
        if not self.config.x0:
            return out
        return (pixels - out) / sigma.to(pixels.dtype).view(-1, 1, 1, 1)
