"""HunyuanImage 2.1 weights: Tencent's original key layout <-> diffusers' ``HunyuanImageTransformer2DModel``.

Tencent's ``hunyuanimage2.1.safetensors`` (and the guidance-distilled ``hunyuanimage2.1-distilled``; what
ComfyUI's UNETLoader reads as ``hunyuanimage2.1_bf16.safetensors``) names the DiT as its reference code
does: ``img_in``, ``txt_in`` (the token refiner: ``input_embedder``, ``t_embedder``, ``c_embedder``,
``individual_token_refiner.blocks.N`` with one fused ``self_attn_qkv``), ``byt5_in`` (the glyph text
projection), ``time_in`` / ``guidance_in`` / ``time_r_in``, ``double_blocks.N`` (``img_attn_q``/``_k``/``_v``
and ``txt_attn_*`` held apart, ``*_mod.linear``, ``*_mlp.fc1/fc2``), ``single_blocks.N`` (``linear1_q/_k/_v``,
``linear1_mlp``, ``linear2.fc``, ``q_norm``/``k_norm``) and ``final_layer``. Older tensor-parallel-free
exports fuse ``img_attn_qkv`` / ``txt_attn_qkv`` and a single block's ``linear1`` (q, k, v, mlp rows) with a
bare ``linear2``; those are split first (:func:`unfuse`). The final layer's modulation is (shift, scale)
where diffusers' ``norm_out`` holds (scale, shift), so its two halves swap. ComfyUI's saved checkpoints add
``model.diffusion_model.`` (:func:`strip`). The config comes from the shapes (:func:`transformer_config`).
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import (  # noqa: F401 (the key modules' interface)
    UNET_PREFIX, count_matches, has_keys, strip)

LABEL = "HunyuanImage 2.1"
#: Detection keys (ComfyUI's own test for the family): the token refiner, the image patch embedder and the
#: ByT5 projection (HunyuanVideo has ``vector_in`` and no ``byt5_in``).
MARKERS = ("txt_in.individual_token_refiner.blocks.0.norm1.weight", "img_in.proj.weight", "byt5_in.fc1.weight")


class KeyMismatch(ValueError):
    """Keys that do not fit the HunyuanImage 2.1 layout (names them)."""


def is_original(keys: Any) -> bool:
    return has_keys(keys, *MARKERS) and not any(k.endswith("vector_in.in_layer.weight") for k in keys)


def is_diffusers(keys: Any) -> bool:
    """diffusers' own names in one file (``context_embedder.token_refiner`` and ``x_embedder.proj``)."""
    return "context_embedder.token_refiner.refiner_blocks.0.norm1.weight" in keys and "x_embedder.proj.weight" in keys


#: Renames shared by both directions: original pattern -> diffusers pattern (whole-name regexes; a block
#: index is ``(\d+)``).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"byt5_in\.layernorm\.", "context_embedder_2.norm."),
    (r"byt5_in\.fc(\d)\.", "context_embedder_2.linear_{0}."),
    (r"img_in\.proj\.", "x_embedder.proj."),
    (r"txt_in\.input_embedder\.", "context_embedder.proj_in."),
    (r"txt_in\.t_embedder\.mlp\.0\.", "context_embedder.time_text_embed.timestep_embedder.linear_1."),
    (r"txt_in\.t_embedder\.mlp\.2\.", "context_embedder.time_text_embed.timestep_embedder.linear_2."),
    (r"txt_in\.c_embedder\.linear_(\d)\.", "context_embedder.time_text_embed.text_embedder.linear_{0}."),
    (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.norm(\d)\.",
     "context_embedder.token_refiner.refiner_blocks.{0}.norm{1}."),
    (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_proj\.",
     "context_embedder.token_refiner.refiner_blocks.{0}.attn.to_out.0."),
    (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.mlp\.fc1\.",
     "context_embedder.token_refiner.refiner_blocks.{0}.ff.net.0.proj."),
    (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.mlp\.fc2\.",
     "context_embedder.token_refiner.refiner_blocks.{0}.ff.net.2."),
    (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.adaLN_modulation\.1\.",
     "context_embedder.token_refiner.refiner_blocks.{0}.norm_out.linear."),
    (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_([qkv])\.",
     "context_embedder.token_refiner.refiner_blocks.{0}.attn.to_{1}."),
    (r"time_in\.mlp\.0\.", "time_guidance_embed.timestep_embedder.linear_1."),
    (r"time_in\.mlp\.2\.", "time_guidance_embed.timestep_embedder.linear_2."),
    (r"time_r_in\.mlp\.0\.", "time_guidance_embed.timestep_embedder_r.linear_1."),
    (r"time_r_in\.mlp\.2\.", "time_guidance_embed.timestep_embedder_r.linear_2."),
    (r"guidance_in\.mlp\.0\.", "time_guidance_embed.guidance_embedder.linear_1."),
    (r"guidance_in\.mlp\.2\.", "time_guidance_embed.guidance_embedder.linear_2."),
    (r"double_blocks\.(\d+)\.img_mod\.linear\.", "transformer_blocks.{0}.norm1.linear."),
    (r"double_blocks\.(\d+)\.txt_mod\.linear\.", "transformer_blocks.{0}.norm1_context.linear."),
    (r"double_blocks\.(\d+)\.img_attn_([qkv])\.", "transformer_blocks.{0}.attn.to_{1}."),
    (r"double_blocks\.(\d+)\.img_attn_([qk])_norm\.", "transformer_blocks.{0}.attn.norm_{1}."),
    (r"double_blocks\.(\d+)\.img_attn_proj\.", "transformer_blocks.{0}.attn.to_out.0."),
    (r"double_blocks\.(\d+)\.img_mlp\.fc1\.", "transformer_blocks.{0}.ff.net.0.proj."),
    (r"double_blocks\.(\d+)\.img_mlp\.fc2\.", "transformer_blocks.{0}.ff.net.2."),
    (r"double_blocks\.(\d+)\.txt_attn_([qkv])\.", "transformer_blocks.{0}.attn.add_{1}_proj."),
    (r"double_blocks\.(\d+)\.txt_attn_([qk])_norm\.", "transformer_blocks.{0}.attn.norm_added_{1}."),
    (r"double_blocks\.(\d+)\.txt_attn_proj\.", "transformer_blocks.{0}.attn.to_add_out."),
    (r"double_blocks\.(\d+)\.txt_mlp\.fc1\.", "transformer_blocks.{0}.ff_context.net.0.proj."),
    (r"double_blocks\.(\d+)\.txt_mlp\.fc2\.", "transformer_blocks.{0}.ff_context.net.2."),
    (r"single_blocks\.(\d+)\.modulation\.linear\.", "single_transformer_blocks.{0}.norm.linear."),
    (r"single_blocks\.(\d+)\.linear1_([qkv])\.", "single_transformer_blocks.{0}.attn.to_{1}."),
    (r"single_blocks\.(\d+)\.([qk])_norm\.", "single_transformer_blocks.{0}.attn.norm_{1}."),
    (r"single_blocks\.(\d+)\.linear1_mlp\.", "single_transformer_blocks.{0}.proj_mlp."),
    (r"single_blocks\.(\d+)\.linear2\.fc\.", "single_transformer_blocks.{0}.proj_out."),
    (r"final_layer\.linear\.", "proj_out."),
    (r"final_layer\.adaLN_modulation\.1\.", "norm_out.linear."),
)
#: The refiner's fused self-attention (always fused in the release), split into q, k, v rows.
_REFINER_QKV = re.compile(r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_qkv\.(weight|bias)$")
#: The final adaLN, whose (shift, scale) halves diffusers holds as (scale, shift).
_SWAPPED = "norm_out.linear."


class RenameTable:
    """Tencent's original names <-> diffusers' by a table of (original pattern, diffusers format) rows, the
    final adaLN's halves swapped and the refiner's q, k, v fused in the original: the rule HunyuanImage 2.1
    and HunyuanVideo 1.5 (nodes.checkpoint.hunyuan_video15_keys) share, each with its own rows."""

    def __init__(self, renames: tuple[tuple[str, str], ...]) -> None:
        self.forward = [(re.compile("^" + a + r"(weight|bias)$"), b) for a, b in renames]
        #: diffusers pattern -> the original's, each capture group filled back in order (:meth:`back`).
        self.backward = [(re.compile("^" + re.escape(b).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", r"(\w)")
                                     + r"(weight|bias)$"), a) for a, b in renames]

    def rename(self, name: str) -> str:
        """The diffusers name of original ``name``; a name no row fits is a :class:`KeyMismatch`."""
        for rx, out in self.forward:
            m = rx.match(name)
            if m:
                *groups, suffix = m.groups()
                return out.format(*groups) + suffix
        raise KeyMismatch(f"unexpected key {name!r}")

    def back(self, name: str) -> str:
        """The original name of diffusers ``name``."""
        for rx, orig in self.backward:
            m = rx.match(name)
            if m:
                *groups, suffix = m.groups()
                text = orig
                for g in groups:
                    text = re.sub(r"\([^)]*\)", g, text, count=1)
                return text.replace("\\", "") + suffix
        raise KeyMismatch(f"unexpected key {name!r}")

    def to_diffusers(self, state: dict[str, Any]) -> dict[str, Any]:
        """diffusers' names for an original-layout state (fused exports split first: :func:`unfuse`)."""
        out = {}
        for k, v in unfuse(dict(state)).items():
            name = self.rename(k)
            out[name] = _halves_swapped(v) if name.startswith(_SWAPPED) else v
        return out

    def to_original(self, state: dict[str, Any]) -> dict[str, Any]:
        """The original layout of a diffusers-layout state, the refiner's q, k, v fused back as released."""
        import torch

        out: dict[str, Any] = {}
        for k, v in state.items():
            out[self.back(k)] = _halves_swapped(v) if k.startswith(_SWAPPED) else v
        for k in [k for k in out if re.match(r"^txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn_q\.", k)]:
            base, kind = k.rsplit(".self_attn_q.", 1)
            out[f"{base}.self_attn_qkv.{kind}"] = torch.cat([out.pop(f"{base}.self_attn_{p}.{kind}") for p in "qkv"])
        return out

    def original_names(self, names: Any) -> dict[str, str]:
        """diffusers name -> original name of the same tensor (the refiner's q, k, v all name its fused qkv)."""
        return {name: re.sub(r"self_attn_[qkv]\.", "self_attn_qkv.", self.back(name)) for name in names}


_TABLE = RenameTable(_RENAMES)


def _halves_swapped(t: Any) -> Any:
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def unfuse(state: dict[str, Any]) -> dict[str, Any]:
    """The release's split names from a fused export: ``*_attn_qkv`` of a double block into ``*_attn_q/_k/_v``,
    a single block's ``linear1`` into q, k, v (hidden rows each) and ``linear1_mlp`` (the rest), a bare
    ``linear2`` into ``linear2.fc``; the refiner's ``self_attn_qkv`` into ``self_attn_q/_k/_v``."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        m = re.match(r"^(double_blocks\.\d+\.(?:img|txt)_attn)_qkv\.(weight|bias)$", k) or _REFINER_QKV.match(k)
        if m and k.startswith("double_blocks"):
            for part, rows in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m.group(1)}_{part}.{m.group(2)}"] = rows
            continue
        if m:
            for part, rows in zip("qkv", v.chunk(3, dim=0)):
                out[f"txt_in.individual_token_refiner.blocks.{m.group(1)}.self_attn_{part}.{m.group(2)}"] = rows
            continue
        m = re.match(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$", k)
        if m:
            hidden = state[f"single_blocks.{m.group(1)}.linear2.weight"].shape[0]
            base = f"single_blocks.{m.group(1)}.linear1"
            for i, part in enumerate("qkv"):
                out[f"{base}_{part}.{m.group(2)}"] = v[i * hidden:(i + 1) * hidden]
            out[f"{base}_mlp.{m.group(2)}"] = v[3 * hidden:]
            continue
        m = re.match(r"^single_blocks\.(\d+)\.linear2\.(weight|bias)$", k)
        out[f"single_blocks.{m.group(1)}.linear2.fc.{m.group(2)}" if m else k] = v
    return out


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names for an original-layout state (fused exports split first); a key that fits no rule
    is a :class:`KeyMismatch` naming it."""
    return _TABLE.to_diffusers(state)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """The original (split) layout of a diffusers-layout state, the refiner's q, k, v fused back."""
    return _TABLE.to_original(state)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """HunyuanImageTransformer2DModel arguments from original-layout shapes (prefix or not, fused or not)."""
    s = strip(dict(shapes))
    try:
        hidden, channels, *patch = s["img_in.proj.weight"]
        head = s["double_blocks.0.img_attn_q_norm.weight"][0]
        mlp = s["double_blocks.0.img_mlp.fc1.weight"][0]
        text = s["txt_in.input_embedder.weight"][1]
        out = s["final_layer.linear.weight"][0]
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    except ValueError:
        raise KeyMismatch("img_in.proj.weight is not a 2-D or 3-D patch convolution") from None
    cells = 1
    for p in patch:
        cells *= p
    byt5 = s.get("byt5_in.fc1.weight")
    return dict(in_channels=channels, out_channels=out // cells, num_attention_heads=hidden // head,
                attention_head_dim=head, num_layers=count_matches(s, r"^double_blocks\.(\d+)\."),
                num_single_layers=count_matches(s, r"^single_blocks\.(\d+)\."),
                num_refiner_layers=count_matches(s, r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
                mlp_ratio=mlp / hidden, patch_size=tuple(patch), qk_norm="rms_norm",
                guidance_embeds="guidance_in.mlp.0.weight" in s, text_embed_dim=text,
                text_embed_2_dim=None if byt5 is None else byt5[1], rope_theta=256.0,
                rope_axes_dim=rope_axes(head, len(patch)), use_meanflow="time_r_in.mlp.0.weight" in s)


def rope_axes(head: int, axes: int) -> tuple[int, ...]:
    """The rotary split of a head: half each for height and width (2-D patches); with 3-D patches (the
    refiner, HunyuanVideo's layout) an eighth for the frame axis and the rest halved (128: 16, 56, 56)."""
    if axes == 2:
        return (head // 2, head // 2)
    frame = head // 8
    return (frame, (head - frame) // 2, (head - frame) // 2)


def original_names(names: Any) -> dict[str, str]:
    """diffusers name -> original name of the same tensor (the refiner's q, k, v all name its fused qkv)."""
    return _TABLE.original_names(names)
