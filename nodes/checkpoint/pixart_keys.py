"""PixArt-α / PixArt-Σ transformer weights: the original key layout <-> diffusers' PixArtTransformer2DModel.

The original files (``PixArt-XL-2-1024-MS.pth``, ``PixArt-Sigma-XL-2-1024-MS.pth`` and their
.safetensors copies, ComfyUI's ``models/diffusion_models``) hold the names of PixArt's own code
(``x_embedder``, ``t_embedder``, ``t_block``, ``y_embedder``, ``blocks.N.attn.qkv`` ...); diffusers
renames them and splits the fused projections (self-attention ``qkv`` into q, k, v; cross-attention
``kv_linear`` into k, v). Two tensors have no diffusers counterpart and are read, not loaded:

* ``y_embedder.y_embedding`` [tokens, 4096]: the learned "null caption" of training-time caption
  dropout. Its row count is the T5 token count the model was trained with: 120 for α, 300 for Σ,
  which is how the two are told apart (ComfyUI reads ``model_max_length`` from it too).
* ``pos_embed`` [1, (size / patch)^2, hidden]: the fixed sin-cos table α's files store, whose length
  gives the sample size (64 latent pixels for the 512 model, 128 for 1024). Σ's files do not store it;
  the sample size then comes from the file name (``256``, ``512``, ``2K``/``2048``) or is 1024's.

α-1024 also has the micro-conditioning embedders (``csize_embedder``, ``ar_embedder``: image size and
aspect ratio), which diffusers calls ``adaln_single.emb.resolution_embedder`` / ``aspect_ratio_embedder``.
The width of a head is not in the weights: every released PixArt uses 72 (16 heads of 1152).
"""
from __future__ import annotations

import math
import re
from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.flux_keys import KeyMismatch  # noqa: F401  (loaders catch keys.KeyMismatch)

#: Every released PixArt transformer (α and Σ, XL-2) has heads 72 wide.
HEAD_WIDTH = 72
#: Only PixArt's original layout has the timestep's shared modulation under this name.
MARKER = "t_block.1.weight"
#: diffusers' layout in one file: the shared modulation and the caption projection.
DIFFUSERS_MARKERS = ("adaln_single.linear.weight", "caption_projection.linear_1.weight")
#: Read for the configuration, never loaded (see the module docstring).
READ_ONLY = ("y_embedder.y_embedding", "pos_embed")
#: T5 tokens of each variant's training (the rows of ``y_embedder.y_embedding``).
ALPHA_TOKENS, SIGMA_TOKENS = 120, 300

#: (original name, diffusers name) of plain renames; weight and bias both.
_TOP = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("final_layer.linear", "proj_out"),
]
#: α-1024's micro-conditioning embedders (optional).
_MICRO = [
    ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
    ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
    ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
    ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
]
#: In block N: (original, diffusers names, how); "split" cuts the fused tensor into equal row blocks.
_BLOCK = [
    ("attn.qkv", ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "split"),
    ("attn.proj", ["attn1.to_out.0"], "rename"),
    ("cross_attn.q_linear", ["attn2.to_q"], "rename"),
    ("cross_attn.kv_linear", ["attn2.to_k", "attn2.to_v"], "split"),
    ("cross_attn.proj", ["attn2.to_out.0"], "rename"),
    ("mlp.fc1", ["ff.net.0.proj"], "rename"),
    ("mlp.fc2", ["ff.net.2"], "rename"),
]

strip = flux_keys.strip


def _blocks(keys: Any, prefix: str) -> list[int]:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def pairs(original_keys: Any, diffusers_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """(original names, diffusers names, how) for every loaded tensor, in either direction (the blocks
    are counted in whichever key set is given); the shape flux_keys' walkers take."""
    micro = any(k.startswith("csize_embedder.") for k in original_keys) or \
        any(k.startswith("adaln_single.emb.resolution_embedder.") for k in diffusers_keys)
    rows: list[tuple[list[str], list[str], str]] = []
    for suffix in ("weight", "bias"):
        rows += [([f"{o}.{suffix}"], [f"{d}.{suffix}"], "rename") for o, d in _TOP + (_MICRO if micro else [])]
    rows += [(["final_layer.scale_shift_table"], ["scale_shift_table"], "rename")]
    for i in _blocks(original_keys, "blocks.") or _blocks(diffusers_keys, "transformer_blocks."):
        rows.append(([f"blocks.{i}.scale_shift_table"], [f"transformer_blocks.{i}.scale_shift_table"], "rename"))
        for suffix in ("weight", "bias"):
            rows += [([f"blocks.{i}.{o}.{suffix}"], [f"transformer_blocks.{i}.{d}.{suffix}" for d in ds], how)
                     for o, ds, how in _BLOCK]
    return rows


def plan(keys: Any) -> list[tuple[str, list[str], str]]:
    """(original name, diffusers names, how) for every loaded tensor of an original-layout key set
    (``model.diffusion_model.`` taken off first). Raises :class:`KeyMismatch` naming missing and
    left-over keys, so a damaged or foreign file is named, not half loaded."""
    keys = set(strip({k: None for k in keys}))
    return flux_keys.plan_from(pairs, keys - set(READ_ONLY))


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers-layout tensors from original-layout ones (the read-only tensors left out)."""
    import torch

    state = strip(dict(state))
    out: dict[str, Any] = {}
    for key, diff, how in plan(state.keys()):
        t = state[key]
        out.update({diff[0]: t} if how == "rename" else dict(zip(diff, torch.chunk(t, len(diff), dim=0))))
    return out


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors from a PixArtTransformer2DModel state dict (the inverse; what the tests
    write as the users' files; the read-only tensors are the caller's to add)."""
    return flux_keys.to_original(state, pairs)


def is_pixart(keys: Any) -> bool:
    """A PixArt transformer in the original layout (bare or under ``model.diffusion_model.``)."""
    return flux_keys.has_keys(keys, MARKER, "blocks.0.cross_attn.kv_linear.weight")


def is_diffusers(keys: Any) -> bool:
    """A PixArt transformer in diffusers' layout in one file."""
    return flux_keys.has_keys(keys, *DIFFUSERS_MARKERS, "transformer_blocks.0.attn2.to_q.weight") and \
        not flux_keys.has_keys(keys, "context_embedder.weight")


def variant(shapes: dict[str, tuple[int, ...]]) -> str:
    """"alpha" or "sigma" from original-layout shapes: the null caption's rows (120 for α, 300 for Σ);
    a file without it is α when it has α-1024's micro-conditioning, else Σ (ComfyUI's rule)."""
    s = strip(dict(shapes))
    y = s.get("y_embedder.y_embedding")
    if y is not None:
        return "alpha" if y[0] == ALPHA_TOKENS else "sigma"
    return "alpha" if "ar_embedder.mlp.0.weight" in s else "sigma"


def sample_size(shapes: dict[str, tuple[int, ...]], name: str = "", patch: int = 2) -> int:
    """The latent sample size: from ``pos_embed``'s length where the file stores it, else from the
    file name's resolution (256, 512, 2K/2048), else 1024's (128)."""
    s = strip(dict(shapes))
    pe = s.get("pos_embed")
    if pe is not None and len(pe) == 3:
        return int(math.isqrt(int(pe[1]))) * patch
    lowered = name.lower()
    for pattern, size in ((r"(2k|2048)", 256), (r"(?<!\d)512(?!\d)", 64), (r"(?<!\d)256(?!\d)", 32)):
        if re.search(pattern, lowered):
            return size
    return 128


def transformer_config(shapes: dict[str, tuple[int, ...]], name: str = "") -> dict[str, Any]:
    """PixArtTransformer2DModel arguments from original-layout shapes: depth, width, heads (72 wide),
    patch size, learned-sigma output, caption width, micro-conditioning and the sample size with the
    positional interpolation scale diffusers' converters give it (sample size / 64)."""
    s = strip(dict(shapes))
    hidden, in_channels, patch, _ = s["x_embedder.proj.weight"]
    if hidden % HEAD_WIDTH:
        raise KeyMismatch(f"x_embedder.proj.weight is {hidden} wide, not a multiple of PixArt's "
                          f"{HEAD_WIDTH}-wide heads")
    out_channels = s["final_layer.linear.weight"][0] // (patch * patch)
    size = sample_size(s, name, patch)
    return dict(num_attention_heads=hidden // HEAD_WIDTH, attention_head_dim=HEAD_WIDTH, in_channels=in_channels,
                out_channels=out_channels, num_layers=len(_blocks(s, "blocks.")), patch_size=patch,
                sample_size=size, interpolation_scale=size / 64, caption_channels=s["y_embedder.y_proj.fc1.weight"][1],
                cross_attention_dim=hidden, use_additional_conditions="csize_embedder.mlp.0.weight" in s,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, dropout=0.0, upcast_attention=False)
