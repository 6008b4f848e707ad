"""HunyuanVideo 1.5 weights (and Capybara's, a checkpoint of the same network): Tencent's original key layout
<-> diffusers' ``HunyuanVideo15Transformer3DModel``.

ComfyUI's UNETLoader files (``hunyuanvideo1.5_*.safetensors``, ``capybara_v0.1.safetensors``) hold the DiT as
Tencent's reference code names it. It is HunyuanImage 2.1's layout (nodes.checkpoint.hunyuan_image_keys: the
token refiner ``txt_in`` with a fused ``self_attn_qkv``, ``byt5_in``, ``double_blocks.N`` with q, k, v held
apart, ``final_layer`` whose (shift, scale) halves diffusers holds as (scale, shift)) without single blocks
or a guidance embedder, plus what HunyuanVideo 1.5 adds: ``vision_in.proj.{0,1,3,4}`` (the SigLIP image
projection: LayerNorm, Linear, GELU, Linear, LayerNorm), ``cond_type_embedding`` (one row per kind of
context token: Qwen, ByT5, image) and the time embedder under ``time_embed`` (``time_r_in`` for the MeanFlow
variants). The facts are diffusers' conversion script's (scripts/convert_hunyuan_video1_5_to_diffusers.py);
the shared rows are HunyuanImage's, read from its table so the two cannot drift apart.
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import hunyuan_image_keys as image_keys
from nodes.checkpoint.flux_keys import UNET_PREFIX, count_matches, has_keys, strip  # noqa: F401 (the interface)

LABEL = "HunyuanVideo 1.5"
#: What only HunyuanVideo 1.5 has (HunyuanImage 2.1 has neither): the context-kind embedding and the
#: image projection; with HunyuanImage's markers they tell the file.
MARKERS = ("cond_type_embedding.weight", "vision_in.proj.1.weight",
           "txt_in.individual_token_refiner.blocks.0.norm1.weight")
DIFFUSERS_MARKERS = ("cond_type_embed.weight", "image_embedder.linear_1.weight", "x_embedder.proj.weight")

KeyMismatch = image_keys.KeyMismatch

_OWN: tuple[tuple[str, str], ...] = (
    (r"time_in\.mlp\.0\.", "time_embed.timestep_embedder.linear_1."),
    (r"time_in\.mlp\.2\.", "time_embed.timestep_embedder.linear_2."),
    (r"time_r_in\.mlp\.0\.", "time_embed.timestep_embedder_r.linear_1."),
    (r"time_r_in\.mlp\.2\.", "time_embed.timestep_embedder_r.linear_2."),
    (r"vision_in\.proj\.0\.", "image_embedder.norm_in."),
    (r"vision_in\.proj\.1\.", "image_embedder.linear_1."),
    (r"vision_in\.proj\.3\.", "image_embedder.linear_2."),
    (r"vision_in\.proj\.4\.", "image_embedder.norm_out."),
    (r"cond_type_embedding\.", "cond_type_embed."),
)
#: HunyuanImage's rows this network shares: everything but its single blocks and time/guidance embedders.
_SHARED = tuple((a, b) for a, b in image_keys._RENAMES
                if not a.startswith(("single_blocks", "time_in", "time_r_in", "guidance_in")))
_TABLE = image_keys.RenameTable(_OWN + _SHARED)


def is_original(keys: Any) -> bool:
    """Tencent's layout (bare; :func:`strip` takes ComfyUI's prefix off first)."""
    return has_keys(keys, *MARKERS)


def is_diffusers(keys: Any) -> bool:
    """diffusers' own names in one file."""
    return all(k in keys for k in DIFFUSERS_MARKERS)


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names for an original-layout state (fused q, k, v split first, HunyuanImage's rule); a key
    that fits no rule is a :class:`KeyMismatch` naming it."""
    return _TABLE.to_diffusers(state)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """The original layout of a diffusers-layout state (the refiner's q, k, v fused back, as released)."""
    return _TABLE.to_original(state)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """HunyuanVideo15Transformer3DModel arguments from original-layout shapes (prefix or not)."""
    s = strip(dict(shapes))
    try:
        hidden, channels, pt, ph, pw = s["img_in.proj.weight"]
        head = s["double_blocks.0.img_attn_q_norm.weight"][0]
        mlp = s["double_blocks.0.img_mlp.fc1.weight"][0]
        text = s["txt_in.input_embedder.weight"][1]
        byt5 = s["byt5_in.fc1.weight"][1]
        image = s["vision_in.proj.1.weight"][1]
        out = s["final_layer.linear.weight"][0]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    except ValueError:
        raise KeyMismatch("img_in.proj.weight is not a 3-D patch convolution") from None
    return dict(in_channels=channels, out_channels=out // (pt * ph * pw), num_attention_heads=hidden // head,
                attention_head_dim=head, num_layers=count_matches(s, r"^double_blocks\.(\d+)\."),
                num_refiner_layers=count_matches(s, r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
                mlp_ratio=mlp / hidden, patch_size=ph, patch_size_t=pt, qk_norm="rms_norm", text_embed_dim=text,
                text_embed_2_dim=byt5, image_embed_dim=image, rope_theta=256.0,
                rope_axes_dim=image_keys.rope_axes(head, 3), use_meanflow="time_r_in.mlp.0.weight" in s)


def original_names(names: Any) -> dict[str, str]:
    """diffusers name -> original name of the same tensor (the refiner's q, k, v all name its fused qkv)."""
    return _TABLE.original_names(names)
