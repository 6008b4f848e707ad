"""SAM 3 / 3.1 checkpoints (ComfyUI's ``sam3.1_multiplex_fp16.safetensors`` and the like) into
transformers' ``Sam3Model``, for CheckpointLoaderSimple.

ComfyUI recognises the file by ``detector.transformer.decoder.query_embed.weight`` next to the
ViT's ``detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight``; SAM 3.1 ("multiplex")
adds ``propagation_convs`` and has a three-level detector neck (scales 4, 2, 1) where SAM 3 has four
(4, 2, 1, 0.5) and leaves the last unused. transformers' Sam3Model always builds four levels and
drops the last, so for 3.1 the unused 0.5 level is filled with zeros: it is computed and discarded,
never read. The interactive decoder (SAM 3's tracker SAM heads, SAM 3.1's interactive ones) is loaded
into transformers' Sam3TrackerModel when the file has it (nodes.checkpoint.sam3_tracker), for
SAM3_Detect's refinement and point prompts; the video tracker's other weights are left out.

Sizes come from the shapes. What shapes cannot tell follows SAM 3's released model (transformers'
Sam3Config defaults, the text tower's GELU included, where ComfyUI's text config says quick_gelu): attention
heads of 64 channels (ViT, text) and 32 (the 256-wide detector), ViT windows of 24 patches with
global attention in the last block of each quarter, 1008-pixel input; where the file keeps the
ViT's RoPE tables (``attn.freqs_cis``) their lengths give the input grid, window and global blocks.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from nodes.checkpoint.sam3_keys import DETECTOR, to_transformers

TRUNK = DETECTOR + "backbone.vision_backbone.trunk."
NECK = DETECTOR + "backbone.vision_backbone.convs."
TEXT = DETECTOR + "backbone.language_backbone.encoder."
QUERY_KEY = DETECTOR + "transformer.decoder.query_embed.weight"
QKV_KEY = TRUNK + "blocks.0.attn.qkv.weight"
SAM31_KEY = DETECTOR + "backbone.vision_backbone.propagation_convs.0.conv_1x1.weight"
IMAGE_SIZE, WINDOW = 1008, 24


def is_sam3(shapes: Mapping[str, Any]) -> bool:
    """ComfyUI's test: the detector's query table and the ViT's first fused qkv."""
    return QUERY_KEY in shapes and QKV_KEY in shapes


def is_sam31(shapes: Mapping[str, Any]) -> bool:
    return SAM31_KEY in shapes


def _count(shapes: Mapping[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _heads(width: int, head_width: int) -> int:
    return max(1, width // head_width)


def _vit_geometry(shapes: Mapping[str, Any], depth: int, patch: int) -> tuple[int, int, list[int]]:
    """(image size, window, global blocks): from the RoPE tables' lengths where the file keeps them."""
    def positions(shape: Any) -> int:  # the table's first non-singleton dimension: one row per position
        return next((int(n) for n in shape if n != 1), 1)

    rows = {i: positions(shapes[TRUNK + f"blocks.{i}.attn.freqs_cis"]) for i in range(depth)
            if TRUNK + f"blocks.{i}.attn.freqs_cis" in shapes}
    quarters = sorted({max(0, (q + 1) * depth // 4 - 1) for q in range(4)})
    if not rows or any(math.isqrt(n) ** 2 != n for n in rows.values()):
        return IMAGE_SIZE, WINDOW, quarters
    longest = max(rows.values())
    grid = math.isqrt(longest)
    glob = sorted(i for i, n in rows.items() if n == longest)
    local = [n for n in rows.values() if n != longest]
    window = math.isqrt(local[0]) if local else WINDOW
    return grid * patch, window, glob


def sam3_config(shapes: Mapping[str, Any]) -> Any:
    """transformers' Sam3Config for the file's shapes."""
    from transformers import Sam3Config

    hidden = shapes[QKV_KEY][1]
    depth = _count(shapes, TRUNK + "blocks.")
    patch = shapes[TRUNK + "patch_embed.proj.weight"][2]
    pretrain_grid = math.isqrt(shapes[TRUNK + "pos_embed"][1] - 1)
    image_size, window, glob = _vit_geometry(shapes, depth, patch)
    queries, d_model = shapes[QUERY_KEY]
    vocab, text_width = shapes[TEXT + "token_embedding.weight"]
    ff = lambda prefix: shapes[DETECTOR + prefix + "linear1.weight"][0]  # noqa: E731
    grid = image_size // patch
    vision = dict(
        backbone_config=dict(
            model_type="sam3_vit_model", hidden_size=hidden, num_hidden_layers=depth,
            intermediate_size=shapes[TRUNK + "blocks.0.mlp.fc1.weight"][0], num_attention_heads=_heads(hidden, 64),
            image_size=image_size, patch_size=patch, window_size=window, global_attn_indexes=glob,
            pretrain_image_size=pretrain_grid * patch),
        fpn_hidden_size=shapes[NECK + "0.conv_3x3.weight"][0],
        backbone_feature_sizes=[[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]])
    # GELU: transformers' SAM 3 text config (facebook/sam3); ComfyUI's SAM3_CLIP_CONFIG says quick_gelu
    text = dict(hidden_act="gelu", vocab_size=vocab, hidden_size=text_width, num_hidden_layers=_count(shapes, TEXT + "transformer.resblocks."),
                intermediate_size=shapes[TEXT + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                num_attention_heads=_heads(text_width, 64),
                max_position_embeddings=shapes[TEXT + "positional_embedding"][0],
                projection_dim=shapes[TEXT + "text_projection"][1])
    heads = _heads(d_model, 32)
    return Sam3Config(
        vision_config=vision, text_config=text,
        geometry_encoder_config=dict(hidden_size=d_model, num_attention_heads=heads,
                                     num_layers=_count(shapes, DETECTOR + "geometry_encoder.encode."),
                                     intermediate_size=ff("geometry_encoder.encode.0.")),
        detr_encoder_config=dict(hidden_size=d_model, num_attention_heads=heads,
                                 num_layers=_count(shapes, DETECTOR + "transformer.encoder.layers."),
                                 intermediate_size=ff("transformer.encoder.layers.0.")),
        detr_decoder_config=dict(hidden_size=d_model, num_attention_heads=heads, num_queries=queries,
                                 num_layers=_count(shapes, DETECTOR + "transformer.decoder.layers."),
                                 intermediate_size=ff("transformer.decoder.layers.0.")),
        mask_decoder_config=dict(hidden_size=d_model, num_attention_heads=heads,
                                 num_upsampling_stages=_count(shapes, DETECTOR + "segmentation_head.pixel_decoder"
                                                                      ".conv_layers.")),
    )


def build(state: Mapping[str, Any], shapes: Mapping[str, Any], dtype: Any) -> tuple[Any, list[str]]:
    """(Sam3Model with the file's weights, the file's keys detection leaves unused)."""
    import torch
    from transformers import Sam3Model

    from nodes.checkpoint.load import CheckpointError, _assign, _empty
    from nodes.checkpoint.sam3_keys import comfy_name

    try:
        config = sam3_config(shapes)
    except (KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(f"the SAM 3 detector is incomplete or of an unknown layout ({exc})") from None
    model = _empty(Sam3Model, config)
    weights, unused = to_transformers(state)
    own_keys = set(model.state_dict())
    if is_sam31(shapes) and NECK + "3.conv_1x1.weight" not in shapes:  # the level Sam3Model builds and drops
        own = model.state_dict()
        for k in own:
            if k.startswith("vision_encoder.neck.fpn_layers.3."):
                weights[k] = torch.zeros(tuple(own[k].shape), dtype=dtype)
    file_names = lambda keys: [comfy_name(k, own_keys) for k in keys]  # noqa: E731 - errors name the file's keys
    model = _assign(model, weights, "SAM 3 detector", dtype, file_names)
    attach_tracker(model, state, shapes, dtype)
    return model, unused


def attach_tracker(model: Any, state: Mapping[str, Any], shapes: Mapping[str, Any], dtype: Any) -> None:
    """Give ``model`` its interactive decoder as ``model.kiln_tracker`` (None without one in the file).

    It is kept outside the module tree (not a submodule): the detector's state dict and weight
    comparisons stay the detector's, and the decoder, which shares the detector's ViT, is moved to
    the compute device by SAM3_Detect when it runs."""
    from nodes.checkpoint import sam3_tracker

    multiplex = is_sam31(shapes)
    tracker = sam3_tracker.build(state, shapes, model, dtype, multiplex) \
        if sam3_tracker.present(shapes, multiplex) else None
    object.__setattr__(model, "kiln_tracker", tracker)


def load_single_file(state: Mapping[str, Any], shapes: Mapping[str, Any], dtype: Any, name: str) -> Any:
    """What CheckpointLoaderSimple holds for a SAM 3 file: the detector (text tower inside) and the
    CLIP tokenizer (padding with token 0, ComfyUI's choice); no VAE. Errors start with the file's ``name``."""
    from nodes.checkpoint.load import CheckpointError, Loaded
    from nodes.checkpoint.tokenizer import PAD_BANG, clip_tokenizer
    from nodes.families.sam3 import FAMILY

    try:
        model, unused = build(state, shapes, dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    version = "SAM 3.1" if is_sam31(shapes) else "SAM 3"
    refine = "with" if getattr(model, "kiln_tracker", None) is not None else "without"
    info = {"format": "single_file", "sam3_version": version, "unused_keys": len(unused),
            "interactive_decoder": refine == "with",
            "prediction_type": "detector",
            "prediction_reason": f"{version} {refine} its interactive decoder, {len(unused)} tracker keys "
                                 f"outside the detector"}
    return Loaded(family=FAMILY, scheduler_config={}, latent=FAMILY.latent, modules={"sam3": model},
                  tokenizers={"tokenizer": clip_tokenizer(PAD_BANG)}, info=info)
