"""SAM 3's interactive decoder (SAM 2-style prompt encoder + mask decoder) from ComfyUI's file into
transformers' ``Sam3TrackerModel``, for SAM3_Detect's ``refine_iterations`` and point prompts.

ComfyUI runs it in ``SAM3Model.forward_segment``: the ViT trunk shared with the detector, a second
FPN neck, ``no_mem_embed`` added to the coarsest level, then the prompt encoder and mask decoder.
The weights live under different names in the two file kinds, with the same structure:

* SAM 3: ``tracker.sam_prompt_encoder.``, ``tracker.sam_mask_decoder.``, ``tracker.no_mem_embed``,
  neck ``detector.backbone.vision_backbone.sam2_convs.`` (four levels; the 0.5 level is dropped);
* SAM 3.1: ``tracker.model.interactive_sam_prompt_encoder.``, ``...interactive_sam_mask_decoder.``,
  ``...interactivity_no_mem_embed``, neck ``...interactive_convs.`` (three levels). 3.1's multiplex
  propagation decoder (``sam_mask_decoder``, 16 objects) is video tracking's and is not loaded.

ComfyUI's decoder always has 8 heads and a downsample rate of 2 in its two-way transformer, and picks
the single-mask token without SAM 2's "dynamic multimask via stability" fallback; the config says so.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from nodes.checkpoint.sam3_keys import NECK_LEVEL

HEADS = 8  # ComfyUI's SAMMaskDecoder: TwoWayTransformer(num_heads=8), whatever the width

#: (ComfyUI name relative to the prompt encoder / mask decoder, transformers name); "{n}" a number.
PROMPT: tuple[tuple[str, str], ...] = (
    ("not_a_point_embed.", "not_a_point_embed."), ("no_mask_embed.", "no_mask_embed."),
    ("mask_downscaling.0.", "mask_embed.conv1."), ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."), ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."))

_MLP3 = (("layers.0.", "proj_in."), ("layers.1.", "layers.0."), ("layers.2.", "proj_out."))
DECODER: tuple[tuple[str, str], ...] = (
    *((f"transformer.layers.{{n}}.{a}.{p}", f"transformer.layers.{{n}}.{a}.{q}")
      for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
      for p, q in (("q_proj.", "q_proj."), ("k_proj.", "k_proj."), ("v_proj.", "v_proj."), ("out_proj.", "o_proj."))),
    *((f"transformer.layers.{{n}}.norm{i}.", f"transformer.layers.{{n}}.layer_norm{i}.") for i in range(1, 5)),
    # ComfyUI's module keeps nn.Sequential indices (mlp.0/mlp.2); Meta's files say mlp.layers.0/1
    ("transformer.layers.{n}.mlp.layers.0.", "transformer.layers.{n}.mlp.proj_in."),
    ("transformer.layers.{n}.mlp.layers.1.", "transformer.layers.{n}.mlp.proj_out."),
    ("transformer.layers.{n}.mlp.0.", "transformer.layers.{n}.mlp.proj_in."),
    ("transformer.layers.{n}.mlp.2.", "transformer.layers.{n}.mlp.proj_out."),
    *((f"transformer.final_attn_token_to_image.{p}", f"transformer.final_attn_token_to_image.{q}")
      for p, q in (("q_proj.", "q_proj."), ("k_proj.", "k_proj."), ("v_proj.", "v_proj."), ("out_proj.", "o_proj."))),
    ("transformer.norm_final_attn.", "transformer.layer_norm_final_attn."),
    ("transformer.norm_final.", "transformer.layer_norm_final_attn."),
    ("output_upscaling.0.", "upscale_conv1."), ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    *((f"output_hypernetworks_mlps.{{n}}.{p}", f"output_hypernetworks_mlps.{{n}}.{q}") for p, q in _MLP3),
    *((f"{head}.{p}", f"{head}.{q}") for head in ("iou_prediction_head", "pred_obj_score_head") for p, q in _MLP3),
    *((name, name) for name in ("iou_token.", "mask_tokens.", "obj_score_token.", "conv_s0.", "conv_s1.")))


def names(multiplex: bool) -> dict[str, str]:
    """The file's prefixes of the interactive decoder's parts for SAM 3 (False) or 3.1 (True)."""
    t = "tracker.model." if multiplex else "tracker."
    i = "interactive_" if multiplex else ""
    return {"prompt": f"{t}{i}sam_prompt_encoder.", "decoder": f"{t}{i}sam_mask_decoder.",
            "no_mem": t + ("interactivity_no_mem_embed" if multiplex else "no_mem_embed"),
            "neck": "detector.backbone.vision_backbone." + ("interactive_convs." if multiplex else "sam2_convs.")}


def _compile(rows: tuple[tuple[str, str], ...], src: str, dst: str, forward: bool) -> list:
    pairs = [(src + a, dst + b) if forward else (dst + b, src + a) for a, b in rows]
    return [(re.compile(re.escape(a).replace(r"\{n\}", r"(\d+)")), b) for a, b in pairs]


def _rules(multiplex: bool, forward: bool) -> list:
    n = names(multiplex)
    return (_compile(PROMPT, n["prompt"], "prompt_encoder.", forward)
            + _compile(DECODER, n["decoder"], "mask_decoder.", forward)
            + _compile(tuple((o, h) for o, h, _ in NECK_LEVEL), n["neck"] + "{n}.", "vision_encoder.neck.fpn_layers.{n}.",
                       forward))


def _rename(key: str, rules: list) -> str | None:
    for pattern, template in rules:
        m = pattern.match(key)
        if m:
            head = template.replace("{n}", m.group(1)) if "{n}" in template else template
            return head + key[m.end():]
    return None


def present(shapes: Mapping[str, Any], multiplex: bool) -> bool:
    """Whether the file carries the interactive decoder (a real file does; a detector-only one not)."""
    n = names(multiplex)
    return all(k in shapes for k in (n["decoder"] + "mask_tokens.weight", n["no_mem"],
                                      n["prompt"] + "pe_layer.positional_encoding_gaussian_matrix",
                                      n["neck"] + "0.conv_1x1.weight"))


def to_transformers(state: Mapping[str, Any], multiplex: bool, levels: int = 3) -> dict[str, Any]:
    """Sam3TrackerModel weights (its ViT left out: it is the detector's) from the file's tensors."""
    import torch

    n, rules, out = names(multiplex), _rules(multiplex, True), {}
    points = {}
    for key, value in state.items():
        if key == n["no_mem"]:
            out["no_memory_embedding"] = value.reshape(1, 1, -1)
        elif key == n["prompt"] + "pe_layer.positional_encoding_gaussian_matrix":
            out["prompt_encoder.shared_embedding.positional_embedding"] = value
            out["shared_image_embedding.positional_embedding"] = value
        elif (m := re.fullmatch(re.escape(n["prompt"]) + r"point_embeddings\.(\d+)\.weight", key)):
            points[int(m.group(1))] = value
        elif (name := _rename(key, rules)) is not None:
            level = re.match(r"vision_encoder\.neck\.fpn_layers\.(\d+)\.", name)
            if level is None or int(level.group(1)) < levels:
                out[name] = value
    if points:
        out["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in sorted(points)], dim=0)
    return out


def to_comfy(state: Mapping[str, Any], multiplex: bool) -> dict[str, Any]:
    """The file's tensors from a Sam3TrackerModel state dict (its ViT skipped): the inverse, for tests."""
    n, rules, out = names(multiplex), _rules(multiplex, False), {}
    # the inverse keeps Meta's names where ComfyUI's module and Meta's files differ
    rules = [r for r in rules if not r[1].endswith((".mlp.0.", ".mlp.2.", ".norm_final."))]
    for key, value in state.items():
        if key.startswith(("vision_encoder.backbone.", "shared_image_embedding.")):
            continue
        if key == "no_memory_embedding":
            out[n["no_mem"]] = value
        elif key == "prompt_encoder.shared_embedding.positional_embedding":
            out[n["prompt"] + "pe_layer.positional_encoding_gaussian_matrix"] = value
        elif key == "prompt_encoder.point_embed.weight":
            for i in range(value.shape[0]):
                out[f"{n['prompt']}point_embeddings.{i}.weight"] = value[i:i + 1]
        else:
            name = _rename(key, rules)
            if name is None:
                raise KeyError(f"no ComfyUI name for Sam3TrackerModel weight {key!r}")
            out[name] = value
    return out


def tracker_config(shapes: Mapping[str, Any], detector_config: Any, multiplex: bool) -> Any:
    """Sam3TrackerConfig: the detector's ViT with a three-level neck, the decoder's sizes from the shapes."""
    from transformers import Sam3TrackerConfig

    n = names(multiplex)
    dec = n["decoder"]
    width = shapes[dec + "iou_token.weight"][1]
    mlp = next(shapes[dec + f"transformer.layers.0.mlp.{k}.weight"][0] for k in ("layers.0", "0")
               if dec + f"transformer.layers.0.mlp.{k}.weight" in shapes)
    layers = len({m.group(1) for k in shapes if (m := re.match(re.escape(dec) + r"transformer\.layers\.(\d+)\.", k))})
    vision = detector_config.vision_config.to_dict()
    vision["scale_factors"] = [4.0, 2.0, 1.0]
    vision["backbone_feature_sizes"] = vision["backbone_feature_sizes"][:3]
    backbone = detector_config.vision_config.backbone_config
    return Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=width, image_size=backbone.image_size, patch_size=backbone.patch_size,
                                   mask_input_channels=shapes[n["prompt"] + "mask_downscaling.3.weight"][0]),
        mask_decoder_config=dict(hidden_size=width, mlp_dim=mlp, num_hidden_layers=layers, num_attention_heads=HEADS,
                                 attention_downsample_rate=2, iou_head_hidden_dim=width,
                                 num_multimask_outputs=shapes[dec + "mask_tokens.weight"][0] - 1,
                                 dynamic_multimask_via_stability=False))


def build(state: Mapping[str, Any], shapes: Mapping[str, Any], detector: Any, dtype: Any, multiplex: bool) -> Any:
    """Sam3TrackerModel with the file's interactive decoder, its ViT the detector's own module (shared)."""
    from transformers import Sam3TrackerModel

    from nodes.checkpoint.load import _assign, _empty

    model = _empty(Sam3TrackerModel, tracker_config(shapes, detector.config, multiplex))
    model.vision_encoder.backbone = detector.vision_encoder.backbone
    weights = to_transformers(state, multiplex)
    for k, v in detector.vision_encoder.backbone.state_dict().items():
        weights["vision_encoder.backbone." + k] = v
    return _assign(model, weights, "SAM 3 interactive decoder", dtype)
