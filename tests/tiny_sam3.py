"""A tiny random SAM 3 detector (transformers' Sam3Model) and its file in ComfyUI's layout.

The file is what ComfyUI's SAM 3 / 3.1 checkpoints hold: Meta's names under ``detector.``
(written by nodes.checkpoint.sam3_keys.to_comfy), RoPE tables per ViT block (their lengths
say the input grid and the attention window), plus weights detection does not use: a
tracker (``tracker.`` for SAM 3, ``tracker.model.`` for 3.1), SAM 3's second neck, or 3.1's
propagation and interactive necks, which drop the detector neck's unused 0.5 level.
With ``tracker`` (:func:`tracker`) the file also carries the interactive decoder in its ComfyUI names
(SAM 3: ``tracker.sam_*`` + ``sam2_convs``; 3.1: ``tracker.model.interactive_sam_*`` + ``interactive_convs``).
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE, PATCH, WINDOW, PRETRAIN = 56, 14, 2, 28
DEPTH, GLOBAL = 2, [1]
TEXT_WIDTH = 48


def config():
    from transformers import Sam3Config

    grid = IMAGE // PATCH
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=DEPTH, num_attention_heads=1, image_size=IMAGE, patch_size=PATCH,
                                 window_size=WINDOW, global_attn_indexes=GLOBAL, pretrain_image_size=PRETRAIN),
            fpn_hidden_size=32, backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2]),
        text_config=dict(hidden_act="gelu", vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=96, projection_dim=24,
                         num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=32),
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=1, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=1, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=32, num_layers=2, num_queries=12, num_attention_heads=1,
                                 intermediate_size=64),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=1),
    )


def model(seed: int = 0):
    """The reference detector, float32, eval; its score head is sharpened so that thresholds near
    0.5 keep some queries and drop others (random init scores all sit near 0.5)."""
    from transformers import Sam3Model

    torch.manual_seed(seed)
    net = Sam3Model(config()).eval()
    with torch.no_grad():
        net.dot_product_scoring.query_proj.weight.mul_(8.0)
        net.dot_product_scoring.text_proj.weight.mul_(8.0)
    return net


def tracker(net, seed: int = 1):
    """The reference interactive decoder: transformers' Sam3TrackerModel sharing ``net``'s ViT, with a
    random three-level neck and decoder (object score pushed above 0, so its masks are not all
    "no object"), its two positional tables one, as in SAM's file."""
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    vision = net.config.vision_config.to_dict()
    vision["scale_factors"], vision["backbone_feature_sizes"] = [4.0, 2.0, 1.0], vision["backbone_feature_sizes"][:3]
    cfg = Sam3TrackerConfig(
        vision_config=vision, prompt_encoder_config=dict(hidden_size=32, image_size=IMAGE, patch_size=PATCH),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=8, iou_head_hidden_dim=32,
                                 dynamic_multimask_via_stability=False))
    torch.manual_seed(seed)
    model = Sam3TrackerModel(cfg).eval()
    model.vision_encoder.backbone = net.vision_encoder.backbone
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # transformers' init (std 0.02) leaves the logits near 1e-5, where a mask's sign is noise and a mask
        # prompt changes nothing visible: weights of unit gain instead
        for name, param in model.named_parameters():
            if param.ndim >= 2 and not name.startswith("vision_encoder.backbone."):
                param.copy_(torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5)
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(4.0)
        model.no_memory_embedding.normal_()
        # one Fourier table in SAM (pe_layer): the image's dense positions and the points both read it
        model.shared_image_embedding.positional_embedding.copy_(model.prompt_encoder.shared_embedding.positional_embedding)
    return model


def comfy_state(net, multiplex: bool, with_tracker=None) -> dict[str, torch.Tensor]:
    """``net``'s weights in ComfyUI's file layout, with the extras a real file carries (and the
    interactive decoder ``with_tracker``, a :func:`tracker`, in its place)."""
    from nodes.checkpoint.sam3_keys import to_comfy

    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    state = to_comfy(net.state_dict())
    grid, head = IMAGE // PATCH, 32
    for i in range(DEPTH):  # RoPE tables: one row per position of the block's attention span
        rows = grid * grid if i in GLOBAL else WINDOW * WINDOW
        state[f"detector.backbone.vision_backbone.trunk.blocks.{i}.attn.freqs_cis"] = rand(rows, head // 2, 2)
    neck = "detector.backbone.vision_backbone."
    tracker = "tracker.model." if multiplex else "tracker."
    state[tracker + "sam_mask_decoder.transformer.layers.0.self_attn.in_proj_weight"] = rand(96, 32)
    state[tracker + "no_mem_embed"] = rand(1, 1, 32)
    state["detector.geometry_encoder.points_direct_project.weight"] = rand(32, 2)
    if multiplex:  # 3.1: three detector levels, and two more necks for the tracker
        for k in [k for k in state if k.startswith(neck + "convs.3.")]:
            del state[k]
        for extra in ("propagation_convs", "interactive_convs"):
            state[f"{neck}{extra}.0.conv_1x1.weight"] = rand(32, 8, 1, 1)
    else:
        state[neck + "sam2_convs.0.conv_1x1.weight"] = rand(32, 8, 1, 1)
    if with_tracker is not None:
        from nodes.checkpoint import sam3_tracker

        for k in [k for k in state if k.startswith((tracker, neck + "sam2_convs.", neck + "interactive_convs."))]:
            del state[k]
        state.update(sam3_tracker.to_comfy(with_tracker.state_dict(), multiplex))
        if not multiplex:  # SAM 3's tracker neck has the fourth (0.5) level too, unused
            for k in [k for k in state if k.startswith(neck + "convs.3.")]:
                state[k.replace("convs.3.", "sam2_convs.3.")] = rand(*state[k].shape)
    return {k: v.contiguous() for k, v in state.items()}


def save(net, path: Path, multiplex: bool, with_tracker=None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(comfy_state(net, multiplex, with_tracker), str(path))
    return path
