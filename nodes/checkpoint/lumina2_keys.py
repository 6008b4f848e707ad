"""Lumina Image 2.0 transformer weights: ComfyUI's NextDiT key layout <-> diffusers' Lumina2Transformer2DModel.

ComfyUI's ``lumina_2_model_bf16.safetensors`` (and the ``model.diffusion_model.`` part of an all-in-one
file such as NetaYume Lumina's) holds the NextDiT names ComfyUI's ``comfy.ldm.lumina`` model reads, the
same names as Z-Image's files (nodes.checkpoint.z_image_keys) without Z-Image's pad tokens:
``layers.N.attention.qkv`` (fused; split and fused again as for Z-Image: nodes.checkpoint.z_image_keys'
``nextdit_*`` helpers, given this module's renames),
``.attention.out``, ``.attention.q_norm`` / ``k_norm``, ``.feed_forward.w1/w2/w3``, ``.attention_norm1/2``,
``.ffn_norm1/2``, ``.adaLN_modulation.1`` (SiLU then Linear), ``x_embedder``, ``t_embedder.mlp.0/2``,
``cap_embedder.0/1``, ``final_layer.linear`` / ``.adaLN_modulation.1`` and an unused ``norm_final.weight``.
diffusers names them otherwise (its own single-file converter, ``convert_lumina2_to_diffusers``, does these
renames for the release's head counts only): ``attn.to_q/to_k/to_v/to_out.0``, ``norm1.linear`` /
``norm1.norm`` (a context-refiner block, unmodulated, has a plain ``norm1``), ``time_caption_embed.*``,
``norm_out.linear_1/2``.
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import UNET_PREFIX, has_keys, strip  # noqa: F401 (the key modules' interface)
from nodes.checkpoint.z_image_keys import (KeyMismatch, block_count, has_pad_tokens, is_original as is_nextdit,
                                           nextdit_lora_modules, nextdit_original_names, nextdit_to_diffusers,
                                           nextdit_to_original)

DIFFUSERS_MARKERS = ("time_caption_embed.caption_embedder.1.weight", "layers.0.attn.to_q.weight")
#: diffusers' name for a block's attention module
ATTN = "attn."
#: (original, diffusers) pieces of a name outside the blocks
_TOP = (("cap_embedder.", "time_caption_embed.caption_embedder."),
        ("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1."),
        ("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2."),
        ("final_layer.adaLN_modulation.1.", "norm_out.linear_1."), ("final_layer.linear.", "norm_out.linear_2."))
#: (original, diffusers) pieces of a name inside a block, after ``<group>.<N>.``
_IN_BLOCK = (("attention.out.", ATTN + "to_out.0."), ("attention.q_norm.", ATTN + "norm_q."),
             ("attention.k_norm.", ATTN + "norm_k."), ("feed_forward.w1.", "feed_forward.linear_1."),
             ("feed_forward.w2.", "feed_forward.linear_2."), ("feed_forward.w3.", "feed_forward.linear_3."),
             ("adaLN_modulation.1.", "norm1.linear."), ("attention_norm1.", "norm1.norm."),
             ("attention_norm2.", "norm2."))
#: the context refiner's blocks are not modulated: their first norm is ``norm1`` itself
_UNMODULATED = (("attention_norm1.", "norm1."),)
_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+\.)(.*)$")
#: Lumina 2's rotary split of its 96-wide heads (ComfyUI's and diffusers' default); other widths: thirds
AXES_96 = (32, 32, 32)
AXES_LENS = (300, 512, 512)
#: diffusers' FFN rounding: the inner width is 4 x dim rounded up to a multiple of this (the release's)
MULTIPLE_OF = 256


def is_original(keys: Any) -> bool:
    """A Lumina 2 NextDiT in ComfyUI's layout: Z-Image's names without its pad tokens."""
    return is_nextdit(keys) and not has_pad_tokens(keys)


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, *DIFFUSERS_MARKERS)


def rope_axes(head: int) -> list[int]:
    """The rotary axes of a ``head``-wide head: (32, 32, 32) for the release's 96, else three even parts
    with the remainder on the first axis (the weights do not say it)."""
    if head == sum(AXES_96):
        return list(AXES_96)
    third = head // 3 // 2 * 2
    return [head - 2 * third, third, third]


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Lumina2Transformer2DModel arguments from original-layout shapes. The FFN width is read (the release's
    rounding when it gives it, else an exact multiplier); the rotary axes as :func:`rope_axes`."""
    s = strip(dict(shapes))
    try:
        dim, patch_in = s["x_embedder.weight"]
        head = s["layers.0.attention.q_norm.weight"][0]
        qkv = s["layers.0.attention.qkv.weight"][0]
        inner = s["layers.0.feed_forward.w1.weight"][0]
        cap = s["cap_embedder.0.weight"][0]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    released = MULTIPLE_OF * -(-4 * dim // MULTIPLE_OF)
    ffn = {"multiple_of": MULTIPLE_OF, "ffn_dim_multiplier": None} if inner == released else \
        {"multiple_of": 1, "ffn_dim_multiplier": (inner + 0.5) / (4 * dim)}
    return dict(sample_size=128, patch_size=2, in_channels=patch_in // 4, hidden_size=dim,
                num_layers=block_count(s, "layers"), num_refiner_layers=block_count(s, "noise_refiner"),
                num_attention_heads=dim // head, num_kv_heads=(qkv - dim) // 2 // head, norm_eps=1e-5,
                scaling_factor=1.0, axes_dim_rope=tuple(rope_axes(head)), axes_lens=AXES_LENS, cap_feat_dim=cap, **ffn)


def _rename(key: str, forward: bool) -> str:
    """One name from the original layout to diffusers' (``forward``) or back; a name in neither table stays."""
    m = _BLOCK.match(key)
    if m is None:
        pairs, head, rest = _TOP, "", key
    else:
        head, rest = m.group(1), m.group(2)
        pairs = (_UNMODULATED + _IN_BLOCK) if head.startswith("context_refiner.") else _IN_BLOCK
    for original, diffusers in pairs:
        a, b = (original, diffusers) if forward else (diffusers, original)
        if rest.startswith(a):
            return head + b + rest[len(a):]
    return key


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors (no prefix) under diffusers' names, each fused qkv split into q, k, v.
    Works on meta tensors and fp8 row scales alike (only rows move)."""
    foreign = sorted(k for k in state if k.startswith(("time_caption_embed.", "norm_out.")) or ".attn." in k)
    if foreign:
        raise KeyMismatch(f"unexpected {foreign[:4]}{' ...' if len(foreign) > 4 else ''} (diffusers' names in an "
                          "original-layout file)")
    return nextdit_to_diffusers(state, _rename, ATTN)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names -> the original layout (q, k, v fused into qkv): what ComfyUI's files hold."""
    return nextdit_to_original(state, _rename, ATTN)


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The original module names LoRAs for Lumina 2 use (``layers.3.attention.qkv`` covering to_q, to_k, to_v)."""
    return nextdit_lora_modules(shapes, _rename, ATTN)


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> the original name of the tensor it is (to_q, to_k, to_v: the fused qkv's)."""
    return nextdit_original_names(diffusers_names, _rename, ATTN)
