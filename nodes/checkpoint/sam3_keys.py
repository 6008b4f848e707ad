"""SAM 3's one key table: ComfyUI's checkpoint layout <-> transformers' ``Sam3Model``.

ComfyUI's SAM 3 / 3.1 files (``sam3.1_multiplex_fp16.safetensors``) keep Meta's own
names under ``detector.`` (the image detector, text tower included) and ``tracker.``
(3.1: ``tracker.model.``; the video tracker, which detection does not use). Their
attentions are fused (``in_proj_weight``, the ViT's ``qkv``), the ViT's position
table carries a class-token row, and the CLIP projection is stored transposed.
transformers splits and renames all of it; this module says how, once, in both
directions: :func:`to_transformers` for the loader, :func:`to_comfy` for the tests
that write a file in ComfyUI's layout from a tiny random model.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

DETECTOR = "detector."

# kinds: "plain" (same tensor), "mha" (in_proj_* split into q/k/v, out_proj -> o_proj),
# "clip_mha" (in_proj_* split, out_proj kept), "qkv" (ViT's fused qkv), "pos" (class-token row
# dropped), "T" (transposed).  "{n}" is a layer index.  First match wins: specific before general.
Row = tuple[str, str, str]


def _under(orig: str, hf: str, rows: tuple[Row, ...]) -> tuple[Row, ...]:
    """``rows`` (names relative to a module) placed under the module's names on both sides."""
    return tuple((orig + o, hf + h, kind) for o, h, kind in rows)


def _mlp(orig: str, hf: str, count: int) -> tuple[Row, ...]:
    """An MLP's numbered layers: Meta's ``layers.i`` -> transformers' ``layer{i+1}``."""
    return tuple((f"{orig}layers.{i}.", f"{hf}layer{i + 1}.", "plain") for i in range(count))


#: Meta's encoder layer (DETR encoder, geometry encoder): attentions, a two-layer MLP, three norms.
ENCODER_LAYER: tuple[Row, ...] = (
    ("cross_attn_image.", "cross_attn.", "mha"), ("self_attn.", "self_attn.", "mha"),
    ("linear1.", "mlp.fc1.", "plain"), ("linear2.", "mlp.fc2.", "plain"),
    ("norm1.", "layer_norm1.", "plain"), ("norm2.", "layer_norm2.", "plain"), ("norm3.", "layer_norm3.", "plain"))

VIT: tuple[Row, ...] = (
    ("pos_embed", "embeddings.position_embeddings", "pos"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection.", "plain"),
    ("ln_pre.", "layer_norm.", "plain"),
    ("blocks.{n}.norm1.", "layers.{n}.layer_norm1.", "plain"), ("blocks.{n}.norm2.", "layers.{n}.layer_norm2.", "plain"),
    ("blocks.{n}.attn.proj.", "layers.{n}.attention.o_proj.", "plain"),
    ("blocks.{n}.attn.qkv.", "layers.{n}.attention.", "qkv"),
    ("blocks.{n}.mlp.", "layers.{n}.mlp.", "plain"))

#: The detector's FPN neck: scale 4 has two transposed convs, scale 2 one.
NECK_LEVEL: tuple[Row, ...] = (
    ("dconv_2x2_0.", "scale_layers.0.", "plain"), ("dconv_2x2_1.", "scale_layers.2.", "plain"),
    ("dconv_2x2.", "scale_layers.0.", "plain"), ("conv_1x1.", "proj1.", "plain"), ("conv_3x3.", "proj2.", "plain"))

#: OpenCLIP's text tower -> CLIPTextModelWithProjection.
CLIP_TEXT: tuple[Row, ...] = (
    ("token_embedding.", "text_model.embeddings.token_embedding.", "plain"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", "plain"),
    ("ln_final.", "text_model.final_layer_norm.", "plain"),
    ("text_projection", "text_projection.weight", "T"),
    *_under("transformer.resblocks.{n}.", "text_model.encoder.layers.{n}.", (
        ("attn.", "self_attn.", "clip_mha"), ("ln_1.", "layer_norm1.", "plain"), ("ln_2.", "layer_norm2.", "plain"),
        ("mlp.c_fc.", "mlp.fc1.", "plain"), ("mlp.c_proj.", "mlp.fc2.", "plain"))))

GEOMETRY: tuple[Row, ...] = (
    *_under("encode.{n}.", "layers.{n}.", ENCODER_LAYER),
    ("img_pre_norm.", "vision_layer_norm.", "plain"), ("encode_norm.", "output_layer_norm.", "plain"),
    ("norm.", "prompt_layer_norm.", "plain"),
    *((name, name, "plain") for name in ("label_embed.", "cls_embed.", "boxes_", "final_proj.")))

DECODER: tuple[Row, ...] = (
    *_under("layers.{n}.", "layers.{n}.", (
        ("self_attn.", "self_attn.", "mha"), ("ca_text.", "text_cross_attn.", "mha"),
        ("cross_attn.", "vision_cross_attn.", "mha"), ("linear1.", "mlp.fc1.", "plain"),
        ("linear2.", "mlp.fc2.", "plain"), ("norm1.", "vision_cross_attn_layer_norm.", "plain"),
        ("catext_norm.", "text_cross_attn_layer_norm.", "plain"), ("norm2.", "self_attn_layer_norm.", "plain"),
        ("norm3.", "mlp_layer_norm.", "plain"))),
    *((name, name, "plain") for name in ("query_embed.", "reference_points.", "presence_token.")),
    *_mlp("presence_token_head.", "presence_head.", 3),
    ("presence_token_out_norm.", "presence_layer_norm.", "plain"),
    ("norm.", "output_layer_norm.", "plain"),
    *_mlp("bbox_embed.", "box_head.", 3), *_mlp("ref_point_head.", "ref_point_head.", 2),
    *_mlp("boxRPB_embed_x.", "box_rpb_embed_x.", 2), *_mlp("boxRPB_embed_y.", "box_rpb_embed_y.", 2))

SEGMENTATION: tuple[Row, ...] = (
    ("pixel_decoder.", "pixel_decoder.", "plain"),
    ("mask_predictor.mask_embed.layers.", "mask_embedder.layers.", "plain"),
    ("mask_embed.layers.", "mask_embedder.layers.", "plain"),
    ("instance_seg_head.", "instance_projection.", "plain"), ("semantic_seg_head.", "semantic_projection.", "plain"),
    ("cross_attend_prompt.", "prompt_cross_attn.", "mha"), ("cross_attn_norm.", "prompt_cross_attn_norm.", "plain"))

TABLE: tuple[Row, ...] = (
    *_under("backbone.vision_backbone.trunk.", "vision_encoder.backbone.", VIT),
    *_under("backbone.vision_backbone.convs.{n}.", "vision_encoder.neck.fpn_layers.{n}.", NECK_LEVEL),
    *_under("backbone.language_backbone.encoder.", "text_encoder.", CLIP_TEXT),
    ("backbone.language_backbone.resizer.", "text_projection.", "plain"),  # Sam3Model.text_projection
    *_under("geometry_encoder.", "geometry_encoder.", GEOMETRY),
    *_under("transformer.encoder.layers.{n}.", "detr_encoder.layers.{n}.", ENCODER_LAYER),
    *_under("transformer.decoder.", "detr_decoder.", DECODER),
    *_mlp("dot_prod_scoring.prompt_mlp.", "dot_product_scoring.text_mlp.", 2),
    ("dot_prod_scoring.prompt_mlp.out_norm.", "dot_product_scoring.text_mlp_out_norm.", "plain"),
    ("dot_prod_scoring.prompt_proj.", "dot_product_scoring.text_proj.", "plain"),
    ("dot_prod_scoring.hs_proj.", "dot_product_scoring.query_proj.", "plain"),
    *_under("segmentation_head.", "mask_decoder.", SEGMENTATION),
)


def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(r"\{n\}", r"(\d+)"))


_FORWARD = [(_pattern(o), h, kind) for o, h, kind in TABLE]
_BACKWARD = [(_pattern(h), o, kind) for o, h, kind in TABLE]


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{n}", match.group(1)) if "{n}" in template else template


def _split3(tensor: Any) -> tuple[Any, Any, Any]:
    third = tensor.shape[0] // 3
    return tensor[:third], tensor[third:2 * third], tensor[2 * third:]


def to_transformers(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(Sam3Model state dict, the file's keys it does not use) from ComfyUI/Meta-layout tensors.

    ``state`` may keep or lack the ``detector.`` prefix. Keys outside the detector (the
    tracker, SAM 3.1's propagation/interactive necks, point-prompt projections, cached RoPE
    tables) are returned as unused: detection does not need them.
    """
    out: dict[str, Any] = {}
    unused: list[str] = []
    for key in state:
        rest = key[len(DETECTOR):] if key.startswith(DETECTOR) else key
        for pattern, template, kind in _FORWARD:
            m = pattern.match(rest)
            if m is None:
                continue
            base, tail = _fill(template, m), rest[m.end():]
            value = state[key]
            if kind == "pos":
                out[base] = value[:, 1:]
            elif kind == "T":
                out[base] = value.t()
            elif kind == "qkv":
                for name, part in zip(("q_proj.", "k_proj.", "v_proj."), _split3(value)):
                    out[base + name + tail] = part
            elif kind in ("mha", "clip_mha") and tail.startswith("in_proj_"):
                kind_of = tail[len("in_proj_"):]
                for name, part in zip(("q_proj.", "k_proj.", "v_proj."), _split3(value)):
                    out[base + name + kind_of] = part
            elif kind == "mha" and tail.startswith("out_proj."):
                out[base + "o_proj." + tail[len("out_proj."):]] = value
            else:
                out[base + tail] = value
            break
        else:
            unused.append(key)
    return out, unused


def to_comfy(state: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI-layout tensors (``detector.`` keys) from a Sam3Model state dict: the inverse of
    :func:`to_transformers` (the position table gets a zero class-token row back)."""
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        for pattern, template, kind in _BACKWARD:
            m = pattern.match(key)
            if m is None:
                continue
            base, tail = DETECTOR + _fill(template, m), key[m.end():]
            if kind == "pos":
                out[base] = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
            elif kind == "T":
                out[base] = value.t().contiguous()
            elif kind == "qkv":
                part, what = tail.split(".", 1)
                fused.setdefault(base + what, {})[part] = value
            elif kind in ("mha", "clip_mha") and tail.split(".")[0] in ("q_proj", "k_proj", "v_proj"):
                part, what = tail.split(".", 1)
                fused.setdefault(base + "in_proj_" + what, {})[part] = value
            elif kind == "mha" and tail.startswith("o_proj."):
                out[base + "out_proj." + tail[len("o_proj."):]] = value
            else:
                out[base + tail] = value
            break
        else:
            raise KeyError(f"no ComfyUI name for Sam3Model weight {key!r}")
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    # a scale-2 neck level has one transposed conv, named dconv_2x2 (scale 4 has _0 and _1)
    for name in [k for k in out if ".dconv_2x2_0." in k]:
        if name.replace(".dconv_2x2_0.", ".dconv_2x2_1.") not in out:
            out[name.replace(".dconv_2x2_0.", ".dconv_2x2.")] = out.pop(name)
    return out


def comfy_name(key: str, model_keys: Any = ()) -> str:
    """The file's name for Sam3Model weight ``key`` (a q/k/v part: its fused tensor's), for error messages;
    ``model_keys`` (the model's weight names) tell a scale-2 neck level's single transposed conv."""
    name = _comfy_name(key)
    if ".dconv_2x2_0." in name and key.replace(".scale_layers.0.", ".scale_layers.2.") not in model_keys:
        name = name.replace(".dconv_2x2_0.", ".dconv_2x2.")
    return name


def _comfy_name(key: str) -> str:
    for pattern, template, kind in _BACKWARD:
        m = pattern.match(key)
        if m is None:
            continue
        base, tail = DETECTOR + _fill(template, m), key[m.end():]
        part = tail.split(".")[0]
        if kind == "qkv":
            return base + tail.split(".", 1)[1]
        if kind in ("mha", "clip_mha") and part in ("q_proj", "k_proj", "v_proj"):
            return base + "in_proj_" + tail.split(".", 1)[1]
        if kind == "mha" and part == "o_proj":
            return base + "out_proj." + tail.split(".", 1)[1]
        return base + tail
    raise KeyError(key)
