"""OmniGen2's forward pass written a second time, plainly, for tests/test_omnigen2.py: the formulas of
ComfyUI's comfy/ldm/omnigen/omnigen2.py re-derived with other means than Kiln's module uses (Python loops
for positions and patches, complex numbers for the rotation, an explicit softmax per head, RMSNorm and
LayerNorm by hand), reading only the module's weights. No reference implementation of OmniGen2 could be
run here; this checks Kiln's module against the formulas, not against ComfyUI's code.
"""
from __future__ import annotations

import math

import torch


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def position_list(caption: int, refs: list[tuple[int, int]], image: tuple[int, int]) -> list[tuple[int, int, int]]:
    """Omni-RoPE ids by the formula: caption i -> (i, i, i); each picture (shift, row, col), the shift
    starting at the caption length and growing by max(rows, cols) after each reference."""
    out = [(i, i, i) for i in range(caption)]
    shift = caption
    for rows, cols in refs + [image]:
        for r in range(rows):
            for c in range(cols):
                out.append((shift, r, c))
        shift += max(rows, cols)
    return out


def phases(ids: list[tuple[int, int, int]], axes: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """Unit complex numbers [tokens, head/2]: pair j of axis a turns by id_a * theta^(-2j/axes[a])."""
    rows = []
    for pos in ids:
        angles = [pos[a] * theta ** (-2 * j / d) for a, d in enumerate(axes) for j in range(d // 2)]
        rows.append(angles)
    angle = torch.tensor(rows, dtype=torch.float64)
    return torch.polar(torch.ones_like(angle), angle)


def turn(x: torch.Tensor, ph: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]: each pair (x[2j], x[2j+1]) as x[2j] + i x[2j+1], multiplied by its phase."""
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * ph[None, :, None]
    return torch.stack([z.real, z.imag], dim=-1).reshape(x.shape).float()


def attention(attn, x: torch.Tensor, ph: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    heads, kv, d = attn.heads, attn.kv_heads, attn.head
    q = rms((x @ attn.to_q.weight.T).view(b, n, heads, d), attn.norm_q.weight, attn.norm_q.eps)
    k = rms((x @ attn.to_k.weight.T).view(b, n, kv, d), attn.norm_k.weight, attn.norm_k.eps)
    v = (x @ attn.to_v.weight.T).view(b, n, kv, d)
    q, k = turn(q, ph), turn(k, ph)
    out = torch.zeros(b, n, heads, d)
    for h in range(heads):
        g = h // (heads // kv)  # query head h reads k/v head g (grouped heads, repeat_interleave)
        scores = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) / math.sqrt(d)
        out[:, :, h] = torch.softmax(scores, dim=-1) @ v[:, :, g]
    return out.reshape(b, n, heads * d) @ attn.to_out[0].weight.T


def feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    a, g = x @ ff.linear_1.weight.T, x @ ff.linear_3.weight.T
    return (a * torch.sigmoid(a) * g) @ ff.linear_2.weight.T


def block(blk, x: torch.Tensor, ph: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    n2, f1, f2 = blk.norm2, blk.ffn_norm1, blk.ffn_norm2
    if not blk.modulated:
        x = x + rms(attention(blk.attn, rms(x, blk.norm1.weight, blk.norm1.eps), ph), n2.weight, n2.eps)
        return x + rms(feed_forward(blk.feed_forward, rms(x, f1.weight, f1.eps)), f2.weight, f2.eps)
    s = temb * torch.sigmoid(temb)
    mod = s @ blk.norm1.linear.weight.T + blk.norm1.linear.bias
    d = x.shape[-1]
    scale_msa, gate_msa, scale_mlp, gate_mlp = (mod[:, i * d:(i + 1) * d][:, None] for i in range(4))
    nx = rms(x, blk.norm1.norm.weight, blk.norm1.norm.eps) * (1 + scale_msa)
    x = x + torch.tanh(gate_msa) * rms(attention(blk.attn, nx, ph), n2.weight, n2.eps)
    ff = feed_forward(blk.feed_forward, rms(x, f1.weight, f1.eps) * (1 + scale_mlp))
    return x + torch.tanh(gate_mlp) * rms(ff, f2.weight, f2.eps)


def patches(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, tokens, 4C]: patch (r, c) row-major, inside it (p1, p2, channel)."""
    b, c, h, w = x.shape
    rows = []
    for r in range(h // 2):
        for col in range(w // 2):
            rows.append(torch.cat([x[:, :, 2 * r + p1, 2 * col + p2] for p1 in range(2) for p2 in range(2)], dim=-1))
    return torch.stack(rows, dim=1)


def unpatch(t: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    out = torch.zeros(t.shape[0], c, h, w)
    k = 0
    for r in range(h // 2):
        for col in range(w // 2):
            for p, (p1, p2) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                out[:, :, 2 * r + p1, 2 * col + p2] = t[:, k, p * c:(p + 1) * c]
            k += 1
    return out


def time_embedding(t: torch.Tensor, channels: int = 256, scale: float = 1000.0) -> torch.Tensor:
    half = channels // 2
    f = torch.tensor([math.exp(-math.log(10000.0) * j / half) for j in range(half)])
    a = scale * t[:, None] * f[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def forward(model, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, refs: list) -> torch.Tensor:
    """The velocity by the formulas (even-sized latents only), float32."""
    axes = tuple(model.config.axes_dim_rope)
    te = model.time_caption_embed.timestep_embedder
    hdn = time_embedding(1.0 - sigma) @ te.linear_1.weight.T + te.linear_1.bias
    temb = (hdn * torch.sigmoid(hdn)) @ te.linear_2.weight.T + te.linear_2.bias
    norm, lin = model.time_caption_embed.caption_embedder
    cap = rms(context, norm.weight, norm.eps) @ lin.weight.T + lin.bias
    c, h, w = x.shape[1:]
    sizes = [(r.shape[-2] // 2, r.shape[-1] // 2) for r in refs]
    ph = phases(position_list(cap.shape[1], sizes, (h // 2, w // 2)), axes)
    n_cap, n_ref = cap.shape[1], sum(a * b for a, b in sizes)
    for blk in model.context_refiner:
        cap = block(blk, cap, ph[:n_cap], None)
    img = patches(x) @ model.x_embedder.weight.T + model.x_embedder.bias
    for blk in model.noise_refiner:
        img = block(blk, img, ph[n_cap + n_ref:], temb)
    seq = [cap]
    if refs:
        e = model.ref_image_patch_embedder
        ref = torch.cat([patches(r) @ e.weight.T + e.bias + model.image_index_embedding[k] for k, r in enumerate(refs)],
                        dim=1)
        for blk in model.ref_image_refiner:
            ref = block(blk, ref, ph[n_cap:n_cap + n_ref], temb)
        seq.append(ref)
    hidden = torch.cat(seq + [img], dim=1)
    for blk in model.layers:
        hidden = block(blk, hidden, ph, temb)
    out = hidden[:, -img.shape[1]:]
    no = model.norm_out
    scale = (temb * torch.sigmoid(temb)) @ no.linear_1.weight.T + no.linear_1.bias
    mean, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
    out = ((out - mean) / torch.sqrt(var + 1e-6)) * (1 + scale[:, None])
    out = out @ no.linear_2.weight.T + no.linear_2.bias
    return -unpatch(out, c, h, w)
