"""Ideogram 4 transformer weights: ComfyUI's key layout <-> diffusers' Ideogram4Transformer2DModel.

Comfy-Org's ``ideogram4*.safetensors`` (conditional and unconditional alike: one architecture) name
the DiT as ComfyUI's ``comfy/ldm/ideogram4`` builds it: ``layers.N.attention.qkv`` (queries, keys
and values fused, in that order along the rows) and ``layers.N.attention.o``; diffusers splits the
first into ``to_q`` / ``to_k`` / ``to_v`` and names the second ``to_out.0``. Every other name is the
same in both (``input_proj``, ``llm_cond_norm`` / ``llm_cond_proj``, ``t_embedding.mlp_in/out``,
``adaln_proj``, ``embed_image_indicator``, the blocks' norms, ``feed_forward.w1/w2/w3``,
``adaln_modulation``, ``final_layer.*``); the norms are plain RMSNorm scales in both, so values move
unchanged. Splitting rows keeps a row scale's rows (int8_convrot, fp8_scaled row scales follow).
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import UNET_PREFIX, has_keys, strip  # noqa: F401 (the key modules' interface)
from nodes.checkpoint.flux_keys import stacked_rows

#: Shared by both layouts (no other family has it); the fused and split attention tell them apart.
MARKER = "llm_cond_proj.weight"
ORIGINAL_MARKER = "layers.0.attention.qkv.weight"
DIFFUSERS_MARKER = "layers.0.attention.to_q.weight"
_QKV = re.compile(r"^(layers\.\d+\.attention\.)qkv\.weight$")
_SPLIT = re.compile(r"^(layers\.\d+\.attention\.)to_([qkv])\.weight$")
#: The release's rotary split of its 256-wide heads (t, h, w frequency counts); other widths keep the ratio.
MROPE_256 = (24, 20, 20)
ROPE_THETA = 5_000_000


class KeyMismatch(ValueError):
    """Keys that do not fit the Ideogram 4 layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, MARKER) and has_keys(keys, ORIGINAL_MARKER)


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, MARKER) and has_keys(keys, DIFFUSERS_MARKER)


def to_diffusers_name(key: str) -> str:
    return key.replace(".attention.o.", ".attention.to_out.0.")


def to_original_name(key: str) -> str:
    """diffusers name -> ComfyUI's (``to_q/k/v`` all name the fused ``qkv``)."""
    m = _SPLIT.match(key)
    if m:
        return m.group(1) + "qkv.weight"
    return key.replace(".attention.to_out.0.", ".attention.o.")


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI-layout tensors (no prefix) under diffusers' names, each fused qkv split in three by rows
    (works on meta tensors and row scales alike)."""
    foreign = sorted(k for k in state if _SPLIT.match(k) or ".to_out." in k)
    if foreign:
        raise KeyMismatch(f"unexpected {foreign[:4]}{' ...' if len(foreign) > 4 else ''} (diffusers' names in a "
                          "ComfyUI-layout file)")
    out = {}
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            if value.shape[0] % 3:
                raise KeyMismatch(f"{key} has {value.shape[0]} rows, not three equal parts")
            for part, piece in zip("qkv", value.chunk(3, dim=0)):
                out[f"{m.group(1)}to_{part}.weight"] = piece
            continue
        out[to_diffusers_name(key)] = value
    return out


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names -> ComfyUI's layout (q, k, v fused by rows): what Comfy-Org's files hold."""
    import torch

    out = {}
    for key, value in state.items():
        m = _SPLIT.match(key)
        if m:
            if m.group(2) == "q":
                parts = [state[f"{m.group(1)}to_{p}.weight"] for p in "qkv"]
                out[m.group(1) + "qkv.weight"] = torch.cat(parts, dim=0)
            continue
        out[to_original_name(key)] = value
    return out


def rope_sections(head: int) -> tuple[int, int, int]:
    """The (t, h, w) frequency counts for heads ``head`` wide: the release's (24, 20, 20) at 256, scaled."""
    return tuple(max(1, s * head // 256) for s in MROPE_256)  # type: ignore[return-value]


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Ideogram4Transformer2DModel arguments from ComfyUI-layout shapes (the rotary split and theta are
    not in the weights: the release's, :func:`rope_sections`)."""
    s = strip(dict(shapes))
    try:
        hidden, in_channels = s["input_proj.weight"]
        head = s["layers.0.attention.norm_q.weight"][0]
        config = dict(
            in_channels=in_channels, num_layers=len({k.split(".")[1] for k in s if k.startswith("layers.")}),
            attention_head_dim=head, num_attention_heads=hidden // head,
            intermediate_size=s["layers.0.feed_forward.w1.weight"][0], adaln_dim=s["adaln_proj.weight"][0],
            llm_features_dim=s[MARKER][1])
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    return config | dict(rope_theta=ROPE_THETA, mrope_section=rope_sections(head), norm_eps=1e-5)


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Original module name -> the diffusers weight it is (a name) or covers (parts with their rows of it).

    ComfyUI has no Ideogram 4 entry in its LoRA key map, so it reads the names of its own model:
    ``diffusion_model.layers.N.attention.qkv`` (and kohya's ``lora_unet_layers_N_attention_qkv``), as
    ostris' AI-Toolkit writes them and diffusers' Ideogram 4 LoRA conversion reads them. A LoRA on the
    fused qkv has one ``down`` and an ``up`` stacking q, k and v: each of to_q / to_k / to_v takes its
    rows of ``up`` (nodes.checkpoint.flux_keys.stacked_rows). The diffusers names themselves (PEFT's
    ``transformer.layers.N.attention.to_q``, a q/k/v LoRA that is one slice of the fused weight) need
    no entry here: nodes.lora_keys reads the model's own names. ``shapes``: the diffusers model's
    parameter shapes."""
    out: dict[str, Any] = {}
    for name in shapes:
        split = _SPLIT.match(name)
        if split and split.group(2) == "q":
            out[split.group(1) + "qkv"] = stacked_rows([f"{split.group(1)}to_{p}.weight" for p in "qkv"], shapes)
        elif name.endswith(".weight") and not split:
            out[to_original_name(name)[: -len(".weight")]] = name
    return out


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> the original name of the tensor holding it."""
    return {name: to_original_name(name) for name in diffusers_names}
