"""Anima's LLM adapter: Qwen3-0.6B hidden states and T5 token ids -> the Cosmos Predict2 DiT's context.

Anima (circlestone-labs) is Cosmos Predict2 2B's DiT trained on a new text path: the prompt's T5 token ids
are embedded (a 32128-row table, T5's vocabulary) and refined by a few transformer blocks that attend to
themselves and, by cross-attention, to Qwen3-0.6B's last hidden state of the same prompt; the result
(one row per T5 token) is what the DiT's cross-attention reads, zero-padded to 512 tokens. diffusers has
no Anima; the facts are ComfyUI's (``comfy/ldm/anima/model.py``), written here from them:

* each block: [RMSNorm, self-attention] (residual), [RMSNorm, cross-attention to the Qwen3 states]
  (residual), [RMSNorm, Linear-GELU-Linear with 4x width and biases] (residual); all RMSNorms eps 1e-6;
* attention: bias-free q/k/v/o projections, q and k RMS-normed per head (eps 1e-6) and then rotated
  (RoPE, theta 10000, the two-halves convention), queries at the T5 token positions, keys at their own
  stream's positions (the Qwen3 tokens' for cross-attention); no masks;
* out: Linear (with bias) to the target width, then RMSNorm.

The module's names are the file's (``llm_adapter.blocks.N.cross_attn.q_proj``), so its weights load by name.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: T5's vocabulary: the ids the adapter embeds are T5 tokenizer ids.
T5_VOCAB = 32128
EPS = 1e-6
ROPE_THETA = 10000.0


def rope(positions: int, head: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [positions, head] in float32: frequencies theta^(-2i/head), each repeated over both halves."""
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, head, 2, device=device, dtype=torch.float32) / head))
    angles = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, tokens, head] rotated by position: x cos + (-second half, first half) sin."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


class AdapterAttention(nn.Module):
    def __init__(self, width: int, source: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head = heads, width // heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(source, width, bias=False)
        self.v_proj = nn.Linear(source, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.q_norm = nn.RMSNorm(self.head, eps=EPS)
        self.k_norm = nn.RMSNorm(self.head, eps=EPS)

    def forward(self, x: torch.Tensor, source: torch.Tensor, query_rope: tuple, key_rope: tuple) -> torch.Tensor:
        b, n, _ = x.shape
        m = source.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head)).transpose(1, 2)
        k = self.k_norm(self.k_proj(source).view(b, m, self.heads, self.head)).transpose(1, 2)
        v = self.v_proj(source).view(b, m, self.heads, self.head).transpose(1, 2)
        q, k = rotate(q, *query_rope), rotate(k, *key_rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class AdapterBlock(nn.Module):
    def __init__(self, width: int, source: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm_self_attn = nn.RMSNorm(width, eps=EPS)
        self.self_attn = AdapterAttention(width, width, heads)
        self.norm_cross_attn = nn.RMSNorm(width, eps=EPS)
        self.cross_attn = AdapterAttention(width, source, heads)
        self.norm_mlp = nn.RMSNorm(width, eps=EPS)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x: torch.Tensor, source: torch.Tensor, own_rope: tuple, source_rope: tuple) -> torch.Tensor:
        normed = self.norm_self_attn(x)
        x = x + self.self_attn(normed, normed, own_rope, own_rope)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, own_rope, source_rope)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """See the module docstring. ``target``: the embedding and output width (the DiT's text width);
    ``width``: the blocks' width (an ``in_proj`` maps between them where they differ, as in ComfyUI)."""

    def __init__(self, source: int = 1024, target: int = 1024, width: int = 1024, layers: int = 6,
                 heads: int = 16, mlp: int = 4096) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(T5_VOCAB, target)
        self.in_proj = nn.Linear(target, width) if width != target else nn.Identity()
        self.blocks = nn.ModuleList(AdapterBlock(width, source, heads, mlp) for _ in range(layers))
        self.out_proj = nn.Linear(width, target)
        self.norm = nn.RMSNorm(target, eps=EPS)

    def forward(self, source: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``source`` [B, source tokens, source width] (Qwen3's states), ``ids`` [B, T5 tokens] -> [B, T5 tokens,
        target]."""
        x = self.in_proj(self.embed(ids))
        head = x.shape[-1] // self.heads
        own, other = rope(x.shape[1], head, x.device), rope(source.shape[1], head, x.device)
        source = source.to(x.dtype)
        for block in self.blocks:
            x = block(x, source, own, other)
        return self.norm(self.out_proj(x))


def adapter_config(shapes: Any, prefix: str = "llm_adapter.") -> dict[str, int]:
    """:class:`LLMAdapter`'s arguments from the file's shapes (heads from the per-head q norm's width)."""
    target = shapes[prefix + "embed.weight"][1]
    width = shapes[prefix + "blocks.0.self_attn.q_proj.weight"][0]
    return dict(source=shapes[prefix + "blocks.0.cross_attn.k_proj.weight"][1], target=target, width=width,
                layers=len({k.split(".")[2] for k in shapes if k.startswith(prefix + "blocks.")}),
                heads=width // shapes[prefix + "blocks.0.self_attn.q_norm.weight"][0],
                mlp=shapes[prefix + "blocks.0.mlp.0.weight"][0])


def anima_dit(llm_adapter: dict[str, int], **config: Any) -> Any:
    """diffusers' CosmosTransformer3DModel of ``config`` with the adapter as its ``llm_adapter`` submodule, so
    the file's names (``llm_adapter.*`` beside the DiT's) are the module's and load, place and patch as one."""
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(**config)
    model.llm_adapter = LLMAdapter(**llm_adapter)
    return model
