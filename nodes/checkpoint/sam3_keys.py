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
TABLE: tuple[tuple[str, str, str], ...] = (
    # vision: ViTDet trunk
    ("backbone.vision_backbone.trunk.pos_embed", "vision_encoder.backbone.embeddings.position_embeddings", "pos"),
    ("backbone.vision_backbone.trunk.patch_embed.proj.",
     "vision_encoder.backbone.embeddings.patch_embeddings.projection.", "plain"),
    ("backbone.vision_backbone.trunk.ln_pre.", "vision_encoder.backbone.layer_norm.", "plain"),
    ("backbone.vision_backbone.trunk.blocks.{n}.norm1.", "vision_encoder.backbone.layers.{n}.layer_norm1.", "plain"),
    ("backbone.vision_backbone.trunk.blocks.{n}.norm2.", "vision_encoder.backbone.layers.{n}.layer_norm2.", "plain"),
    ("backbone.vision_backbone.trunk.blocks.{n}.attn.proj.", "vision_encoder.backbone.layers.{n}.attention.o_proj.",
     "plain"),
    ("backbone.vision_backbone.trunk.blocks.{n}.attn.qkv.", "vision_encoder.backbone.layers.{n}.attention.", "qkv"),
    ("backbone.vision_backbone.trunk.blocks.{n}.mlp.", "vision_encoder.backbone.layers.{n}.mlp.", "plain"),
    # vision: the detector's FPN neck (scale 4: two transposed convs; scale 2: one)
    ("backbone.vision_backbone.convs.{n}.dconv_2x2_0.", "vision_encoder.neck.fpn_layers.{n}.scale_layers.0.", "plain"),
    ("backbone.vision_backbone.convs.{n}.dconv_2x2_1.", "vision_encoder.neck.fpn_layers.{n}.scale_layers.2.", "plain"),
    ("backbone.vision_backbone.convs.{n}.dconv_2x2.", "vision_encoder.neck.fpn_layers.{n}.scale_layers.0.", "plain"),
    ("backbone.vision_backbone.convs.{n}.conv_1x1.", "vision_encoder.neck.fpn_layers.{n}.proj1.", "plain"),
    ("backbone.vision_backbone.convs.{n}.conv_3x3.", "vision_encoder.neck.fpn_layers.{n}.proj2.", "plain"),
    # text: OpenCLIP tower -> CLIPTextModelWithProjection; the resizer is Sam3Model.text_projection
    ("backbone.language_backbone.encoder.token_embedding.",
     "text_encoder.text_model.embeddings.token_embedding.", "plain"),
    ("backbone.language_backbone.encoder.positional_embedding",
     "text_encoder.text_model.embeddings.position_embedding.weight", "plain"),
    ("backbone.language_backbone.encoder.ln_final.", "text_encoder.text_model.final_layer_norm.", "plain"),
    ("backbone.language_backbone.encoder.text_projection", "text_encoder.text_projection.weight", "T"),
    ("backbone.language_backbone.encoder.transformer.resblocks.{n}.attn.",
     "text_encoder.text_model.encoder.layers.{n}.self_attn.", "clip_mha"),
    ("backbone.language_backbone.encoder.transformer.resblocks.{n}.ln_1.",
     "text_encoder.text_model.encoder.layers.{n}.layer_norm1.", "plain"),
    ("backbone.language_backbone.encoder.transformer.resblocks.{n}.ln_2.",
     "text_encoder.text_model.encoder.layers.{n}.layer_norm2.", "plain"),
    ("backbone.language_backbone.encoder.transformer.resblocks.{n}.mlp.c_fc.",
     "text_encoder.text_model.encoder.layers.{n}.mlp.fc1.", "plain"),
    ("backbone.language_backbone.encoder.transformer.resblocks.{n}.mlp.c_proj.",
     "text_encoder.text_model.encoder.layers.{n}.mlp.fc2.", "plain"),
    ("backbone.language_backbone.resizer.", "text_projection.", "plain"),
    # geometry (box prompt) encoder
    ("geometry_encoder.encode.{n}.cross_attn_image.", "geometry_encoder.layers.{n}.cross_attn.", "mha"),
    ("geometry_encoder.encode.{n}.self_attn.", "geometry_encoder.layers.{n}.self_attn.", "mha"),
    ("geometry_encoder.encode.{n}.linear1.", "geometry_encoder.layers.{n}.mlp.fc1.", "plain"),
    ("geometry_encoder.encode.{n}.linear2.", "geometry_encoder.layers.{n}.mlp.fc2.", "plain"),
    ("geometry_encoder.encode.{n}.norm1.", "geometry_encoder.layers.{n}.layer_norm1.", "plain"),
    ("geometry_encoder.encode.{n}.norm2.", "geometry_encoder.layers.{n}.layer_norm2.", "plain"),
    ("geometry_encoder.encode.{n}.norm3.", "geometry_encoder.layers.{n}.layer_norm3.", "plain"),
    ("geometry_encoder.img_pre_norm.", "geometry_encoder.vision_layer_norm.", "plain"),
    ("geometry_encoder.encode_norm.", "geometry_encoder.output_layer_norm.", "plain"),
    ("geometry_encoder.norm.", "geometry_encoder.prompt_layer_norm.", "plain"),
    ("geometry_encoder.label_embed.", "geometry_encoder.label_embed.", "plain"),
    ("geometry_encoder.cls_embed.", "geometry_encoder.cls_embed.", "plain"),
    ("geometry_encoder.boxes_", "geometry_encoder.boxes_", "plain"),
    ("geometry_encoder.final_proj.", "geometry_encoder.final_proj.", "plain"),
    # DETR encoder
    ("transformer.encoder.layers.{n}.cross_attn_image.", "detr_encoder.layers.{n}.cross_attn.", "mha"),
    ("transformer.encoder.layers.{n}.self_attn.", "detr_encoder.layers.{n}.self_attn.", "mha"),
    ("transformer.encoder.layers.{n}.linear1.", "detr_encoder.layers.{n}.mlp.fc1.", "plain"),
    ("transformer.encoder.layers.{n}.linear2.", "detr_encoder.layers.{n}.mlp.fc2.", "plain"),
    ("transformer.encoder.layers.{n}.norm1.", "detr_encoder.layers.{n}.layer_norm1.", "plain"),
    ("transformer.encoder.layers.{n}.norm2.", "detr_encoder.layers.{n}.layer_norm2.", "plain"),
    ("transformer.encoder.layers.{n}.norm3.", "detr_encoder.layers.{n}.layer_norm3.", "plain"),
    # DETR decoder
    ("transformer.decoder.layers.{n}.self_attn.", "detr_decoder.layers.{n}.self_attn.", "mha"),
    ("transformer.decoder.layers.{n}.ca_text.", "detr_decoder.layers.{n}.text_cross_attn.", "mha"),
    ("transformer.decoder.layers.{n}.cross_attn.", "detr_decoder.layers.{n}.vision_cross_attn.", "mha"),
    ("transformer.decoder.layers.{n}.linear1.", "detr_decoder.layers.{n}.mlp.fc1.", "plain"),
    ("transformer.decoder.layers.{n}.linear2.", "detr_decoder.layers.{n}.mlp.fc2.", "plain"),
    ("transformer.decoder.layers.{n}.norm1.", "detr_decoder.layers.{n}.vision_cross_attn_layer_norm.", "plain"),
    ("transformer.decoder.layers.{n}.catext_norm.", "detr_decoder.layers.{n}.text_cross_attn_layer_norm.", "plain"),
    ("transformer.decoder.layers.{n}.norm2.", "detr_decoder.layers.{n}.self_attn_layer_norm.", "plain"),
    ("transformer.decoder.layers.{n}.norm3.", "detr_decoder.layers.{n}.mlp_layer_norm.", "plain"),
    ("transformer.decoder.query_embed.", "detr_decoder.query_embed.", "plain"),
    ("transformer.decoder.reference_points.", "detr_decoder.reference_points.", "plain"),
    ("transformer.decoder.presence_token.", "detr_decoder.presence_token.", "plain"),
    ("transformer.decoder.presence_token_head.layers.0.", "detr_decoder.presence_head.layer1.", "plain"),
    ("transformer.decoder.presence_token_head.layers.1.", "detr_decoder.presence_head.layer2.", "plain"),
    ("transformer.decoder.presence_token_head.layers.2.", "detr_decoder.presence_head.layer3.", "plain"),
    ("transformer.decoder.presence_token_out_norm.", "detr_decoder.presence_layer_norm.", "plain"),
    ("transformer.decoder.norm.", "detr_decoder.output_layer_norm.", "plain"),
    ("transformer.decoder.bbox_embed.layers.0.", "detr_decoder.box_head.layer1.", "plain"),
    ("transformer.decoder.bbox_embed.layers.1.", "detr_decoder.box_head.layer2.", "plain"),
    ("transformer.decoder.bbox_embed.layers.2.", "detr_decoder.box_head.layer3.", "plain"),
    ("transformer.decoder.ref_point_head.layers.0.", "detr_decoder.ref_point_head.layer1.", "plain"),
    ("transformer.decoder.ref_point_head.layers.1.", "detr_decoder.ref_point_head.layer2.", "plain"),
    ("transformer.decoder.boxRPB_embed_x.layers.0.", "detr_decoder.box_rpb_embed_x.layer1.", "plain"),
    ("transformer.decoder.boxRPB_embed_x.layers.1.", "detr_decoder.box_rpb_embed_x.layer2.", "plain"),
    ("transformer.decoder.boxRPB_embed_y.layers.0.", "detr_decoder.box_rpb_embed_y.layer1.", "plain"),
    ("transformer.decoder.boxRPB_embed_y.layers.1.", "detr_decoder.box_rpb_embed_y.layer2.", "plain"),
    # scoring
    ("dot_prod_scoring.prompt_mlp.layers.0.", "dot_product_scoring.text_mlp.layer1.", "plain"),
    ("dot_prod_scoring.prompt_mlp.layers.1.", "dot_product_scoring.text_mlp.layer2.", "plain"),
    ("dot_prod_scoring.prompt_mlp.out_norm.", "dot_product_scoring.text_mlp_out_norm.", "plain"),
    ("dot_prod_scoring.prompt_proj.", "dot_product_scoring.text_proj.", "plain"),
    ("dot_prod_scoring.hs_proj.", "dot_product_scoring.query_proj.", "plain"),
    # segmentation head
    ("segmentation_head.pixel_decoder.", "mask_decoder.pixel_decoder.", "plain"),
    ("segmentation_head.mask_predictor.mask_embed.layers.", "mask_decoder.mask_embedder.layers.", "plain"),
    ("segmentation_head.mask_embed.layers.", "mask_decoder.mask_embedder.layers.", "plain"),
    ("segmentation_head.instance_seg_head.", "mask_decoder.instance_projection.", "plain"),
    ("segmentation_head.semantic_seg_head.", "mask_decoder.semantic_projection.", "plain"),
    ("segmentation_head.cross_attend_prompt.", "mask_decoder.prompt_cross_attn.", "mha"),
    ("segmentation_head.cross_attn_norm.", "mask_decoder.prompt_cross_attn_norm.", "plain"),
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
