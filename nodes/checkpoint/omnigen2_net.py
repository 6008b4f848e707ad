"""OmniGen2's diffusion transformer (VectorSpaceLab), written for Kiln: a Lumina-style DiT whose parameter
names are the keys of ComfyUI's ``omnigen2_fp16.safetensors``, so the file loads with no renaming.

diffusers has no OmniGen2 transformer, so this module is Kiln's own, written from the facts of ComfyUI's
``comfy/ldm/omnigen/omnigen2.py`` (its workflows must run unchanged) and OmniGen2's repository:

* **Inputs.** The noisy latent and each reference latent are cut into 2x2 patches (``(p1 p2 c)`` order)
  and embedded by ``x_embedder`` / ``ref_image_patch_embedder``; reference k gets ``image_index_embedding[k]``
  added (five rows: at most five references). The caption (Qwen2.5-VL 3B's last hidden state) goes through
  ``time_caption_embed.caption_embedder`` (RMSNorm, Linear). The time input is ``1 - sigma`` (1 = clean),
  embedded as diffusers' sinusoid (cos first) of ``1000 * (1 - sigma)`` (ComfyUI's ``timestep_scale``).
* **Blocks.** Lumina 2's block (q/k RMS norms, grouped k/v heads, sandwich norms, tanh gates, SwiGLU)
  under diffusers-like names. Three refiners run apart before the joint stack: ``context_refiner``
  (unmodulated) on the caption, ``noise_refiner`` on the image, ``ref_image_refiner`` on the references;
  then ``layers`` on ``[caption; references; image]`` with no mask.
* **Positions (Omni-RoPE).** Caption token i: (i, i, i). Reference k: (shift_k, row, column) with
  ``shift_0`` = caption length and ``shift_{k+1} = shift_k + max(rows_k, columns_k)``; the image:
  (shift after the last reference, row, column). Each refiner sees its part's slice of these positions.
  Axes split the head in three (40, 40, 40 for the release's 120), theta 10000, rotating interleaved pairs.
* **Output.** The image tokens of the joint stack, ``norm_out`` (LayerNorm without affine, scaled by the
  time), unpatched, cropped, negated: the flow velocity (noise - clean) Kiln's steppers take.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nodes.families.input_checks import pad_to_patches

THETA = 10000.0
PATCH = 2
#: Rows of ``image_index_embedding``: the most reference images the release can tell apart.
MAX_REFERENCES = 5


class Config(dict):
    """The build arguments, readable as attributes (what Kiln reads off a diffusers ``config``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def timestep_sinusoid(t: torch.Tensor, channels: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True``, shift 0, the given scale:
    [cos(scale t f_j), sin(scale t f_j)] with f_j = 10000^(-j / half)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def positions(caption: int, references: Sequence[tuple[int, int]], image: tuple[int, int]) -> torch.Tensor:
    """Omni-RoPE position ids [caption + sum(references) + image tokens, 3] (see the module docstring);
    sizes are in patches (rows, columns)."""
    parts = [torch.arange(caption)[:, None].expand(caption, 3)]
    shift = caption
    for rows, cols in [*references, image]:
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).reshape(-1, 2)
        parts.append(torch.cat([torch.full((rows * cols, 1), shift), grid], dim=1))
        shift += max(rows, cols)
    return torch.cat(parts).to(torch.int64)


def rotary(ids: torch.Tensor, axes: Sequence[int], theta: float = THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [tokens, head / 2] of position ids [tokens, len(axes)]: axis a rotates its pairs by
    position * theta^(-2j / axes[a]) (FLUX's EmbedND rule), computed in float64 and kept in float32."""
    angles = []
    for a, dim in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[:, a].to(torch.float64)[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1)
    return torch.cos(angle).float(), torch.sin(angle).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, D] with its interleaved pairs (x0, x1) rotated: (c x0 - s x1, s x0 + c x1), in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    c, s = cos[None, :, None], sin[None, :, None]
    out = torch.stack([c * pairs[..., 0] - s * pairs[..., 1], s * pairs[..., 0] + c * pairs[..., 1]], dim=-1)
    return out.reshape(x.shape).to(x.dtype)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (H, W even) -> [B, (H/2)(W/2), 4C] in ``(p1 p2 c)`` order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for an [H, W] latent."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, h // PATCH, w // PATCH, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


class Attention(nn.Module):
    """Self-attention with q/k RMS norms over the head, grouped k/v heads and rotary positions."""

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, heads * self.head, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * self.head, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * self.head, bias=False)
        self.norm_q = nn.RMSNorm(self.head, eps=eps)
        self.norm_k = nn.RMSNorm(self.head, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(heads * self.head, dim, bias=False)])

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.to_q(x).view(b, n, self.heads, self.head))
        k = self.norm_k(self.to_k(x).view(b, n, self.kv_heads, self.head))
        v = self.to_v(x).view(b, n, self.kv_heads, self.head)
        q, k = rotate(q, *rope), rotate(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_heads < self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """SwiGLU: linear_2(silu(linear_1 x) * linear_3 x)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner, bias=False)
        self.linear_2 = nn.Linear(inner, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)) * self.linear_3(x))


class Modulation(nn.Module):
    """``norm1`` of a modulated block: RMSNorm and the time's (scale_msa, gate_msa, scale_mlp, gate_mlp)."""

    def __init__(self, dim: int, time_dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(time_dim, 4 * dim)
        self.norm = nn.RMSNorm(dim, eps=eps)


class Block(nn.Module):
    """One transformer block (module docstring): sandwich-normed attention and feed-forward, tanh gates
    and a scale from the time when ``modulated`` (the context refiner's are not)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, inner: int, time_dim: int, eps: float,
                 modulated: bool = True) -> None:
        super().__init__()
        self.modulated = modulated
        self.attn = Attention(dim, heads, kv_heads)
        self.feed_forward = FeedForward(dim, inner)
        self.norm1 = Modulation(dim, time_dim, eps) if modulated else nn.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=eps)
        self.norm2 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                temb: torch.Tensor | None = None) -> torch.Tensor:
        if not self.modulated:
            x = x + self.norm2(self.attn(self.norm1(x), rope))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.norm1.linear(F.silu(temb)).chunk(4, dim=1)
        x = x + gate_msa[:, None].tanh() * self.norm2(self.attn(self.norm1.norm(x) * (1 + scale_msa[:, None]), rope))
        ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
        return x + gate_mlp[:, None].tanh() * self.ffn_norm2(ff)


class TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeCaptionEmbed(nn.Module):
    def __init__(self, dim: int, time_dim: int, text_dim: int, eps: float, channels: int = 256) -> None:
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedder(channels, time_dim)
        self.caption_embedder = nn.Sequential(nn.RMSNorm(text_dim, eps=eps), nn.Linear(text_dim, dim))


class NormOut(nn.Module):
    """LayerNorm without affine, scaled by ``1 + linear_1(silu(temb))``, then ``linear_2`` to the patch."""

    def __init__(self, dim: int, time_dim: int, out: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(time_dim, dim)
        self.linear_2 = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(x.dtype))
        return self.linear_2(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale)[:, None])


class OmniGen2Transformer(nn.Module):
    """The network (module docstring); arguments as :func:`nodes.checkpoint.omnigen2_load.transformer_config`
    reads them from a file's shapes."""

    def __init__(self, hidden_size: int = 2520, num_attention_heads: int = 21, num_kv_heads: int = 7,
                 num_layers: int = 32, num_refiner_layers: int = 2, in_channels: int = 16, ffn_inner: int = 10240,
                 text_feat_dim: int = 2048, axes_dim_rope: Sequence[int] = (40, 40, 40), norm_eps: float = 1e-5,
                 timestep_scale: float = 1000.0) -> None:
        super().__init__()
        self.config = Config(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                             num_kv_heads=num_kv_heads, num_layers=num_layers, num_refiner_layers=num_refiner_layers,
                             in_channels=in_channels, ffn_inner=ffn_inner, text_feat_dim=text_feat_dim,
                             axes_dim_rope=tuple(axes_dim_rope), norm_eps=norm_eps, timestep_scale=timestep_scale)
        dim, time_dim, patch_in = hidden_size, min(hidden_size, 1024), PATCH * PATCH * in_channels

        def blocks(n: int, modulated: bool = True) -> nn.ModuleList:
            return nn.ModuleList([Block(dim, num_attention_heads, num_kv_heads, ffn_inner, time_dim, norm_eps,
                                        modulated) for _ in range(n)])

        self.x_embedder = nn.Linear(patch_in, dim)
        self.ref_image_patch_embedder = nn.Linear(patch_in, dim)
        self.time_caption_embed = TimeCaptionEmbed(dim, time_dim, text_feat_dim, norm_eps)
        self.noise_refiner = blocks(num_refiner_layers)
        self.ref_image_refiner = blocks(num_refiner_layers)
        self.context_refiner = blocks(num_refiner_layers, modulated=False)
        self.layers = blocks(num_layers)
        self.norm_out = NormOut(dim, time_dim, patch_in)
        self.image_index_embedding = nn.Parameter(torch.zeros(MAX_REFERENCES, dim))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a norm's weight's: never fp8), as a diffusers model reports it."""
        return self.time_caption_embed.caption_embedder[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                references: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The flow velocity [B, C, H, W] at noise level ``sigma`` [B] (0 clean .. 1 noise) of latent ``x``,
        for caption states ``context`` [B, L, text_feat_dim] (every token attended) and model-space
        reference latents [B, C, h, w] each."""
        if len(references) > MAX_REFERENCES:
            raise ValueError(f"OmniGen2 tells apart at most {MAX_REFERENCES} reference images, got {len(references)}")
        dtype = self.dtype
        h, w = x.shape[-2:]
        x = pad_to_patches(x.to(dtype), PATCH)
        hp, wp = x.shape[-2:]
        refs = [pad_to_patches(r.to(dtype), PATCH) for r in references]
        tce = self.time_caption_embed
        temb = tce.timestep_embedder(timestep_sinusoid(1.0 - sigma, tce.channels,
                                                       self.config.timestep_scale).to(dtype))
        cap = tce.caption_embedder(context.to(dtype))
        ref_sizes = [(r.shape[-2] // PATCH, r.shape[-1] // PATCH) for r in refs]
        ids = positions(cap.shape[1], ref_sizes, (hp // PATCH, wp // PATCH))
        cos, sin = (t.to(x.device) for t in rotary(ids, self.config.axes_dim_rope))
        n_cap, n_ref = cap.shape[1], sum(r * c for r, c in ref_sizes)

        def part(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            return cos[start:end], sin[start:end]

        for block in self.context_refiner:
            cap = block(cap, part(0, n_cap))
        img = self.x_embedder(patchify(x))
        for block in self.noise_refiner:
            img = block(img, part(n_cap + n_ref, ids.shape[0]), temb)
        joint = [cap]
        if refs:
            index = self.image_index_embedding.to(dtype)
            ref = torch.cat([self.ref_image_patch_embedder(patchify(r)) + index[k] for k, r in enumerate(refs)], dim=1)
            for block in self.ref_image_refiner:
                ref = block(ref, part(n_cap, n_cap + n_ref), temb)
            joint.append(ref)
        hidden = torch.cat([*joint, img], dim=1)
        for block in self.layers:
            hidden = block(hidden, (cos, sin), temb)
        out = self.norm_out(hidden[:, -img.shape[1]:], temb)
        return -unpatchify(out, hp, wp)[:, :, :h, :w]
