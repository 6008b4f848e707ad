"""Cosmos Predict2 transformer weights: the original (NVIDIA / ComfyUI) key layout <-> diffusers'
``CosmosTransformer3DModel``.

NVIDIA's checkpoints (``model.pt`` of Cosmos-Predict2-2B/14B-Text2Image) hold the ``MiniTrainDIT`` under
``net.``; ComfyUI's repackaged ``cosmos_predict2_2B_t2i.safetensors`` holds the same names bare (and a
ComfyUI-saved checkpoint under ``model.diffusion_model.``). The names (diffusers' converter
``convert_cosmos_transformer_checkpoint_to_diffusers`` renames the same way, for its "cosmos-2.0" keys):

* ``x_embedder.proj.1`` -> ``patch_embed.proj``; ``t_embedder.1.linear_{1,2}`` -> ``time_embed.t_embedder``;
  ``t_embedding_norm`` -> ``time_embed.norm``; ``final_layer.adaln_modulation.{1,2}`` -> ``norm_out.linear_{1,2}``,
  ``final_layer.linear`` -> ``proj_out``;
* in ``blocks.N`` (diffusers' ``transformer_blocks.N``): ``self_attn`` / ``cross_attn`` -> ``attn1`` / ``attn2``
  with ``q_proj k_proj v_proj output_proj q_norm k_norm`` -> ``to_q to_k to_v to_out.0 norm_q norm_k``;
  ``adaln_modulation_{self_attn,cross_attn,mlp}.{1,2}`` -> ``norm{1,2,3}.linear_{1,2}``;
  ``mlp.layer1`` / ``layer2`` -> ``ff.net.0.proj`` / ``ff.net.2``.

Buffers and training counters the original files carry (``pos_embedder.*``, ``accum_*``, ``_extra_state``)
are not weights and are dropped. Anima's files add ``llm_adapter.*`` (nodes.checkpoint.anima_keys), which
this map leaves to that module. A key outside the map is a :class:`KeyMismatch` naming it.
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import UNET_PREFIX, has_keys  # noqa: F401 (the key modules' interface)

#: NVIDIA's own checkpoints keep the network under this prefix.
NET_PREFIX = "net."
#: Keys only a Cosmos Predict2 DiT has in the original layout (ComfyUI's detection reads the first).
ORIGINAL_MARKERS = ("blocks.0.mlp.layer1.weight", "x_embedder.proj.1.weight", "t_embedding_norm.weight")
DIFFUSERS_MARKERS = ("transformer_blocks.0.ff.net.0.proj.weight", "patch_embed.proj.weight", "time_embed.norm.weight")
#: Original-layout tensors that are not weights of the network (buffers, training counters).
DROPPED = re.compile(r"^(pos_embedder\.|accum_|.*_extra_state$)")

_TOP = {"x_embedder.proj.1.": "patch_embed.proj.", "t_embedder.1.": "time_embed.t_embedder.",
        "t_embedding_norm.": "time_embed.norm.", "final_layer.adaln_modulation.1.": "norm_out.linear_1.",
        "final_layer.adaln_modulation.2.": "norm_out.linear_2.", "final_layer.linear.": "proj_out."}
_IN_BLOCK = {"adaln_modulation_self_attn.1.": "norm1.linear_1.", "adaln_modulation_self_attn.2.": "norm1.linear_2.",
             "adaln_modulation_cross_attn.1.": "norm2.linear_1.", "adaln_modulation_cross_attn.2.": "norm2.linear_2.",
             "adaln_modulation_mlp.1.": "norm3.linear_1.", "adaln_modulation_mlp.2.": "norm3.linear_2.",
             "mlp.layer1.": "ff.net.0.proj.", "mlp.layer2.": "ff.net.2."}
for _attn, _ours in (("self_attn.", "attn1."), ("cross_attn.", "attn2.")):
    for _theirs, _mine in (("q_proj.", "to_q."), ("k_proj.", "to_k."), ("v_proj.", "to_v."),
                           ("output_proj.", "to_out.0."), ("q_norm.", "norm_q."), ("k_norm.", "norm_k.")):
        _IN_BLOCK[_attn + _theirs] = _ours + _mine
#: Anima's LLM adapter: the same names in every layout.
ADAPTER = "llm_adapter."
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_DIFFUSERS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")


class KeyMismatch(ValueError):
    """Keys that do not fit the Cosmos Predict2 layout (names them)."""


def strip(state: dict[str, Any]) -> dict[str, Any]:
    """The tensors without ComfyUI's ``model.diffusion_model.`` or NVIDIA's ``net.`` prefix."""
    for prefix in (UNET_PREFIX, NET_PREFIX):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def is_original(keys: Any) -> bool:
    keys = strip({k: None for k in keys})
    return has_keys(keys, *ORIGINAL_MARKERS)


def is_diffusers(keys: Any) -> bool:
    return has_keys(strip({k: None for k in keys}), *DIFFUSERS_MARKERS)


def _to_diffusers_name(key: str) -> str | None:
    """diffusers' name of one original key, None for a key outside the map."""
    for theirs, ours in _TOP.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    m = _BLOCK.match(key)
    if m:
        for theirs, ours in _IN_BLOCK.items():
            if m.group(2).startswith(theirs):
                return f"transformer_blocks.{m.group(1)}.{ours}{m.group(2)[len(theirs):]}"
    return None


def to_original_name(key: str) -> str | None:
    """The original layout's name of one diffusers key, None for a key outside the map."""
    for theirs, ours in _TOP.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = _DIFFUSERS_BLOCK.match(key)
    if m:
        for theirs, ours in _IN_BLOCK.items():
            if m.group(2).startswith(ours):
                return f"blocks.{m.group(1)}.{theirs}{m.group(2)[len(ours):]}"
    return None


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """The DiT's tensors under diffusers' names; an unknown key is a KeyMismatch naming it (the dropped buffers
    are left out; Anima's ``llm_adapter.*`` keeps its names, the module's: nodes.checkpoint.anima_adapter)."""
    out, foreign = {}, []
    for key, value in state.items():
        if DROPPED.match(key):
            continue
        if key.startswith(ADAPTER):
            out[key] = value
            continue
        name = _to_diffusers_name(key)
        if name is None:
            foreign.append(key)
        else:
            out[name] = value
    if foreign:
        raise KeyMismatch(f"unexpected {sorted(foreign)[:4]}{' ...' if len(foreign) > 4 else ''}")
    return out


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`original_to_diffusers` (a diffusers-layout file brought to the original names)."""
    out, foreign = {}, []
    for key, value in state.items():
        if key.startswith(ADAPTER):
            out[key] = value
            continue
        name = to_original_name(key)
        if name is None:
            foreign.append(key)
        else:
            out[name] = value
    if foreign:
        raise KeyMismatch(f"unexpected {sorted(foreign)[:4]}{' ...' if len(foreign) > 4 else ''} (not diffusers' "
                          "CosmosTransformer3DModel names)")
    return out


def block_count(shapes: Any) -> int:
    return len({int(m.group(1)) for k in shapes for m in [_BLOCK.match(k)] if m})


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """CosmosTransformer3DModel's config from original-layout shapes: ComfyUI's detection rules
    (heads 128 wide, the padding-mask channel in the patch embedder's input, the text-to-image RoPE
    extrapolation (1, 4, 4) for 16 latent channels and (1, 3, 3) for Video2World's 17)."""
    try:
        hidden, patch_in = shapes["x_embedder.proj.1.weight"]
        head = shapes["blocks.0.self_attn.q_norm.weight"][0]
        text = shapes["blocks.0.cross_attn.k_proj.weight"][1]
        lora = shapes["blocks.0.adaln_modulation_self_attn.1.weight"][0]
        mlp = shapes["blocks.0.mlp.layer1.weight"][0]
        out = shapes["final_layer.linear.weight"][0]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    in_channels = patch_in // 4 - 1  # 2x2 patches of the latent and the padding mask
    adapter = {}
    if any(k.startswith(ADAPTER) for k in shapes):  # Anima: nodes.checkpoint.anima_adapter.anima_dit's argument
        from nodes.checkpoint.anima_adapter import adapter_config

        adapter["llm_adapter"] = adapter_config(shapes, ADAPTER)
    return adapter | dict(in_channels=in_channels, out_channels=out // 4, num_attention_heads=hidden // head,
                attention_head_dim=head, num_layers=block_count(shapes), mlp_ratio=mlp / hidden,
                text_embed_dim=text, adaln_lora_dim=lora, max_size=(128, 240, 240), patch_size=(1, 2, 2),
                rope_scale=(1.0, 4.0, 4.0) if in_channels == 16 else (1.0, 3.0, 3.0), concat_padding_mask=True,
                extra_pos_embed_type=None)
