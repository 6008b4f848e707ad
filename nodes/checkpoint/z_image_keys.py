"""Z-Image transformer weights: the original (ComfyUI / Tongyi) key layout <-> diffusers' ZImageTransformer2DModel.

ComfyUI's ``z_image_turbo_bf16.safetensors`` holds the Lumina-2-style NextDiT names ComfyUI's
``comfy.ldm.lumina`` model reads: ``layers.N.attention.qkv`` (q, k and v stacked row-wise: the query
heads, then the key/value heads), ``.attention.out``, ``.attention.q_norm`` / ``k_norm``,
``x_embedder``, ``final_layer.*`` and an unused top-level ``norm_final.weight``; the rest
(``feed_forward.w1/w2/w3``, the four block norms, ``adaLN_modulation.0``, ``t_embedder.mlp``,
``cap_embedder``, ``noise_refiner`` / ``context_refiner``, ``x_pad_token`` / ``cap_pad_token``) is named
as diffusers names it. diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers`` does the
same renames (it splits the fused qkv in three equal parts, which holds for the release: 30 query
and 30 key/value heads); this map splits by the head counts the shapes give, and
tests/test_z_image_loading.py checks it against diffusers' converter.

Lumina Image 2.0 has the same layout without the pad tokens; Kiln tells them apart by those. Its diffusers
names differ (nodes.checkpoint.lumina2_keys), its fused qkv splits by :func:`split_qkv` here too.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from nodes.checkpoint.flux_keys import UNET_PREFIX, has_keys, strip  # noqa: F401 (the key modules' interface)
from nodes.checkpoint.flux_keys import stacked_rows

#: keys only a Z-Image (not a Lumina 2) NextDiT has, and the layout's own markers
PAD_TOKENS = ("x_pad_token", "cap_pad_token")
ORIGINAL_MARKERS = ("cap_embedder.1.weight", "layers.0.attention.qkv.weight")
DIFFUSERS_MARKERS = ("cap_embedder.1.weight", "layers.0.attention.to_q.weight", "all_x_embedder.2-1.weight")
#: patch sizes of every release (2x2 pixels, 1 frame): diffusers' ModuleDict key
PATCH = "2-1"
UNUSED = ("norm_final.weight",)
#: (original, diffusers) renames of whole name pieces; the rest is the same in both
_RENAMES = (("final_layer.", f"all_final_layer.{PATCH}."), ("x_embedder.", f"all_x_embedder.{PATCH}."),
            (".attention.out.", ".attention.to_out.0."), (".attention.q_norm.", ".attention.norm_q."),
            (".attention.k_norm.", ".attention.norm_k."))
#: name pieces only diffusers' layout has
_DIFFUSERS_ONLY = (".to_q.", ".to_k.", ".to_v.", ".to_out.", ".norm_q.", ".norm_k.")
#: ``rename(key, forward)``: one name from the original layout to diffusers' (forward) or back
Rename = Callable[[str, bool], str]
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.")


class KeyMismatch(ValueError):
    """Keys that do not fit the Z-Image layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, *ORIGINAL_MARKERS)


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, *DIFFUSERS_MARKERS)


def has_pad_tokens(keys: Any) -> bool:
    return has_keys(keys, *PAD_TOKENS)


def rope_axes(head: int) -> list[int]:
    """The rotary axes of a ``head``-wide attention head: the release's (32, 48, 48) split of 128 kept in
    proportion at other widths, the remainder on the first axis. The weights do not say it; FIBO 2's and
    Krea 2's transformers split their heads the same way (nodes.checkpoint.fibo2_keys, krea2_keys)."""
    axes = [head // 4, head * 3 // 8, head * 3 // 8]
    axes[0] += head - sum(axes)
    return axes


def block_count(shapes: Any, group: str) -> int:
    """How many blocks of ``group`` (``layers``, ``noise_refiner``, ``context_refiner``) a NextDiT's keys hold."""
    return len({int(m.group(2)) for k in shapes for m in [_BLOCK.match(k)] if m and m.group(1) == group})


def split_qkv(state: dict[str, Any], value: Any, base: str, out: dict[str, Any]) -> None:
    """A NextDiT's fused ``attention.qkv.weight`` (``value``) into ``out`` as ``base`` + ``to_q``, ``to_k``,
    ``to_v``: ``dim`` query rows (``x_embedder``'s width), then equal key and value rows, so any head
    counts split right. Only rows move (meta tensors, fp8 row scales alike)."""
    if "x_embedder.weight" not in state:
        raise KeyMismatch("missing 'x_embedder.weight'")
    dim = state["x_embedder.weight"].shape[0]
    kv = (value.shape[0] - dim) // 2
    out[base + "to_q.weight"], out[base + "to_k.weight"], out[base + "to_v.weight"] = value.split([dim, kv, kv], dim=0)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """ZImageTransformer2DModel arguments from original-layout shapes. The rotary axes are not in the
    weights: the release splits its 128-wide heads as (32, 48, 48); other widths keep those proportions."""
    s = strip(dict(shapes))
    try:
        dim, patch_in = s["x_embedder.weight"]
        head = s["layers.0.attention.q_norm.weight"][0]
        qkv = s["layers.0.attention.qkv.weight"][0]
        cap = s["cap_embedder.0.weight"][0]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    return dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=patch_in // 4, dim=dim,
                n_layers=block_count(s, "layers"), n_refiner_layers=block_count(s, "noise_refiner"),
                n_heads=dim // head,
                n_kv_heads=(qkv - dim) // 2 // head, norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap,
                rope_theta=256.0, t_scale=1000.0, axes_dims=rope_axes(head), axes_lens=[1536, 512, 512])


def _rename(key: str, forward: bool) -> str:
    for original, diffusers in _RENAMES:
        a, b = (original, diffusers) if forward else (diffusers, original)
        if key.startswith(a) or (a.startswith(".") and a in key):
            key = b + key[len(a):] if key.startswith(a) else key.replace(a, b)
    return key


def nextdit_to_diffusers(state: dict[str, Any], rename: Rename, attn: str = "attention.") -> dict[str, Any]:
    """A NextDiT's original-layout tensors (no prefix) under diffusers' names: each fused qkv split into
    q, k, v under ``attn`` (diffusers' attention module name: Z-Image's ``attention.``, Lumina 2's
    ``attn.``; :func:`split_qkv`), the rest renamed by ``rename(key, True)``, the unused norm left out.
    Shared by Z-Image and Lumina 2 (nodes.checkpoint.lumina2_keys)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in UNUSED:
            continue
        if key.endswith(".attention.qkv.weight"):
            split_qkv(state, value, key[: -len("attention.qkv.weight")] + attn, out)
            continue
        out[rename(key, True)] = value
    return out


def nextdit_to_original(state: dict[str, Any], rename: Rename, attn: str = "attention.") -> dict[str, Any]:
    """diffusers' names -> a NextDiT's original layout (q, k, v under ``attn`` stacked into
    ``attention.qkv``, the rest by ``rename(key, False)``): what ComfyUI's files hold."""
    import torch

    out: dict[str, Any] = {}
    for key, value in state.items():
        if f".{attn}to_k." in key or f".{attn}to_v." in key:
            continue
        if key.endswith(f".{attn}to_q.weight"):
            base = key[: -len("to_q.weight")]
            out[base[: -len(attn)] + "attention.qkv.weight"] = torch.cat(
                [value, state[base + "to_k.weight"], state[base + "to_v.weight"]])
            continue
        out[rename(key, False)] = value
    return out


def nextdit_lora_modules(shapes: dict[str, tuple[int, ...]], rename: Rename,
                         attn: str = "attention.") -> dict[str, Any]:
    """Original module name -> the diffusers weight it is (a name) or covers (parts with their rows of
    it): NextDiT LoRAs are written against the original names (``layers.3.attention.qkv``), whose fused
    qkv splits row-wise onto to_q, to_k, to_v under ``attn``. ``shapes``: the diffusers model's parameter
    shapes; ``rename(name, False)``: diffusers' name to the original one."""
    out: dict[str, Any] = {}
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        if f".{attn}to_q." in name:
            base = name[: -len("to_q.weight")]
            out[base[: -len(attn)] + "attention.qkv"] = stacked_rows([f"{base}to_{p}.weight" for p in "qkv"], shapes)
            continue
        if f".{attn}to_k." in name or f".{attn}to_v." in name:
            continue
        original = rename(name, False)
        if original != name:
            out[original[: -len(".weight")]] = name
    return out


def nextdit_original_names(diffusers_names: Any, rename: Rename, attn: str = "attention.") -> dict[str, str]:
    """diffusers name -> the original name of the tensor it is (to_q, to_k, to_v under ``attn``: the
    fused ``attention.qkv``'s; the rest by ``rename(name, False)``)."""
    fused = re.compile(rf"^(.*\.){re.escape(attn)}to_[qkv]\.(.*)$")
    out = {}
    for name in diffusers_names:
        m = fused.match(name)
        out[name] = f"{m.group(1)}attention.qkv.{m.group(2)}" if m else rename(name, False)
    return out


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """Original-layout tensors (no prefix) under diffusers' names, the fused qkv split into q, k, v by
    the head counts (:func:`nextdit_to_diffusers`). Works on meta tensors and on fp8 row scales alike."""
    foreign = sorted(k for k in state if k.startswith("all_") or any(p in k for p in _DIFFUSERS_ONLY))
    if foreign:
        raise KeyMismatch(f"unexpected {foreign[:4]}{' ...' if len(foreign) > 4 else ''} (diffusers' names in an "
                          "original-layout file)")
    return nextdit_to_diffusers(state, _rename)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names -> the original layout (q, k, v stacked into qkv): what ComfyUI's files hold."""
    return nextdit_to_original(state, _rename)


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Z-Image's LoRA module names (:func:`nextdit_lora_modules`)."""
    return nextdit_lora_modules(shapes, _rename)


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> the original name of the tensor it is (to_q, to_k, to_v: the fused qkv's)."""
    return nextdit_original_names(diffusers_names, _rename)
