"""SAM3_Detect's refine_iterations and point prompts: SAM 3's interactive decoder, loaded from ComfyUI's
file (SAM 3's tracker SAM heads, SAM 3.1's interactive ones) into transformers' Sam3TrackerModel.

The reference is transformers' Sam3TrackerModel built tiny (tiny_sam3.tracker) and run here by hand
with ComfyUI's rules written out (comfy_extras/nodes_sam3.py _refine_mask and the point path,
comfy/ldm/sam3 forward_segment / forward_sam_heads): the crop, the mask prompt, the object-score
gate, the resizes and the OR with the coarse mask.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tiny_sam3
from engine.context import NodeError
from flow_family_files import env, registry  # noqa: F401 (fixtures)
from node_call import Called, call

SAM3_FILE, SAM31_FILE, PLAIN_FILE = "tiny-sam3-tracker.safetensors", "sam3.1_multiplex_fp16.safetensors", "plain.safetensors"
HEIGHT, WIDTH, THRESHOLD = 40, 52, 0.3
S = tiny_sam3.IMAGE


@pytest.fixture(scope="module")
def net():
    return tiny_sam3.model()


@pytest.fixture(scope="module")
def tracker(net):
    return tiny_sam3.tracker(net)


@pytest.fixture(scope="module")
def root(tmp_path_factory, net, tracker) -> Path:
    root = tmp_path_factory.mktemp("sam3-refine-models")
    tiny_sam3.save(net, root / "checkpoints" / SAM3_FILE, multiplex=False, with_tracker=tracker)
    tiny_sam3.save(net, root / "checkpoints" / SAM31_FILE, multiplex=True, with_tracker=tracker)
    tiny_sam3.save(net, root / "checkpoints" / PLAIN_FILE, multiplex=False)
    return root


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(3))


def _run(registry, env, name, image, text="guitar:3, lamp:2", **kw):
    model, clip, _ = call(registry.get("CheckpointLoaderSimple"), env, ckpt_name=name)
    cond = call(registry.get("CLIPTextEncode"), env, text=text, clip=clip)[0] if text is not None else None
    record = Called()
    args = dict(threshold=THRESHOLD, refine_iterations=2, individual_masks=True) | kw
    masks, boxes = call(registry.get("SAM3_Detect"), env, record, model=model, image=image, conditioning=cond, **args)
    return masks, boxes, record, cond


def _decode(tracker, pixels, embeddings=None, **prompts):
    """One pass of the reference decoder as ComfyUI's forward_sam_heads: [1, 1, S, S] logits, and the
    image embeddings for the next pass."""
    multi = "input_points" in prompts and prompts["input_points"].shape[2] == 1
    image_in = {"pixel_values": pixels} if embeddings is None else {"image_embeddings": embeddings}
    out = tracker(**image_in, **prompts, multimask_output=multi)
    masks = out.pred_masks[:, 0]
    if multi:
        masks = masks[:, out.iou_scores[0, 0].argmax()][:, None]
    masks = torch.where(out.object_score_logits[:, 0, :, None, None] > 0, masks, torch.full_like(masks, -1024.0))
    return F.interpolate(masks, size=(S, S), mode="bilinear", align_corners=False), out.image_embeddings


def _reference_refine(tracker, image, coarse, box, iterations):
    from nodes.sam3_nodes import pixel_values

    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    cx1, cy1 = max(0, int(x1 - bw * 0.1)), max(0, int(y1 - bh * 0.1))
    cx2, cy2 = min(WIDTH, int(x2 + bw * 0.1)), min(HEIGHT, int(y2 + bh * 0.1))
    pixels = pixel_values(image[None, cy1:cy2, cx1:cx2], S)
    logits, emb = coarse[cy1:cy2, cx1:cx2][None, None], None
    for _ in range(iterations):
        prompt = F.interpolate(F.interpolate(logits, size=(S, S), mode="bilinear", align_corners=False),
                               size=(4 * S // tiny_sam3.PATCH,) * 2, mode="bilinear", align_corners=False,
                               antialias=True)
        logits, emb = _decode(tracker, pixels, emb, input_masks=prompt)
    full = torch.zeros(HEIGHT, WIDTH)
    full[cy1:cy2, cx1:cx2] = F.interpolate(logits, size=(cy2 - cy1, cx2 - cx1), mode="bilinear",
                                           align_corners=False)[0, 0]
    return ((full > 0) | (coarse > 0)).float()


@pytest.mark.parametrize("name", [SAM3_FILE, SAM31_FILE])
def test_interactive_decoder_loads_with_the_same_weights(registry, env, tracker, name):
    model, _, _ = call(registry.get("CheckpointLoaderSimple"), env, ckpt_name=name)
    with model.unet() as loaded:
        got = loaded.kiln_tracker
        assert got.vision_encoder.backbone is loaded.vision_encoder.backbone  # the detector's ViT, shared
        assert got.config.mask_decoder_config.dynamic_multimask_via_stability is False
        got_state = {k: v for k, v in got.state_dict().items() if not k.startswith("vision_encoder.backbone.")}
    want = {k: v for k, v in tracker.state_dict().items() if not k.startswith("vision_encoder.backbone.")}
    assert set(got_state) == set(want)
    for k, v in want.items():
        assert torch.equal(got_state[k].float(), v), k


def test_comfyui_module_names_map_too(tracker):
    """ComfyUI's own module names (mlp.0 / mlp.2, norm_final) load like Meta's (mlp.layers.0/1, norm_final_attn)."""
    from nodes.checkpoint import sam3_tracker

    meta = sam3_tracker.to_comfy(tracker.state_dict(), multiplex=False)
    comfy = {k.replace(".mlp.layers.0.", ".mlp.0.").replace(".mlp.layers.1.", ".mlp.2.")
             .replace(".norm_final_attn.", ".norm_final."): v for k, v in meta.items()}
    assert comfy != meta
    a, b = sam3_tracker.to_transformers(meta, False), sam3_tracker.to_transformers(comfy, False)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("iterations", [1, 2])
def test_refine_equals_the_tracker_run_by_hand(registry, env, net, tracker, image, iterations):
    from nodes.sam3_nodes import detect_frame, pixel_values, text_prompts

    masks, boxes, record, cond = _run(registry, env, SAM3_FILE, image, refine_iterations=iterations)
    assert not any("refine_iterations" in m for m in record.messages)
    with torch.inference_mode():
        found, coarse = detect_frame(net, pixel_values(image, S), text_prompts(cond, tiny_sam3.TEXT_WIDTH),
                                     THRESHOLD, (HEIGHT, WIDTH))
        assert [b["score"] for b in found] == pytest.approx([b["score"] for b in boxes[0]], abs=1e-6)
        want = torch.stack([_reference_refine(tracker, image[0], c, (b["x"], b["y"], b["x"] + b["width"],
                                                                     b["y"] + b["height"]), iterations)
                            for b, c in zip(found, coarse)])
    assert masks.shape == want.shape and masks.shape[0] > 1
    differ = (masks != want).float().mean()
    assert differ <= 0.0005, float(differ)


def test_refine_zero_is_unchanged_and_refining_is_not_vacuous(registry, env, image):
    raw, boxes0, record0, _ = _run(registry, env, SAM3_FILE, image, refine_iterations=0)
    plain, boxes_plain, _, _ = _run(registry, env, PLAIN_FILE, image, refine_iterations=0)
    assert torch.equal(raw, plain) and boxes0 == boxes_plain
    assert not any("refine_iterations" in m for m in record0.messages)
    refined, boxes2, _, _ = _run(registry, env, SAM3_FILE, image, refine_iterations=2)
    assert boxes2 == boxes0
    assert bool((refined >= raw).all())  # OR-ed with the coarse mask
    assert int((refined != raw).sum()) > 0  # and the decoder added to it
    union, _, _, _ = _run(registry, env, SAM3_FILE, image, refine_iterations=2, individual_masks=False)
    assert torch.equal(union[0], (refined > 0).any(dim=0).float())
    # a file without the decoder: coarse masks and a note, as before
    _, _, record, _ = _run(registry, env, PLAIN_FILE, image, refine_iterations=2)
    assert any("refine_iterations=2" in m and "coarse" in m for m in record.messages)


@pytest.mark.parametrize("pos,neg,iterations", [('[{"x": 20, "y": 14}]', None, 2),
                                                ('[{"x": 20, "y": 14}, {"x": 40, "y": 30}]', '[{"x": 5, "y": 35}]', 1),
                                                ('[{"x": 20, "y": 14}, {"x": 40, "y": 30}]', '[{"x": 5, "y": 35}]', 2)])
def test_points_equal_the_tracker_run_by_hand(registry, env, tracker, image, pos, neg, iterations):
    import json

    from nodes.sam3_nodes import pixel_values

    masks, boxes, _, _ = _run(registry, env, SAM31_FILE, image, text=None, positive_coords=pos,
                              negative_coords=neg, refine_iterations=iterations)
    assert boxes == [[]] and masks.shape == (1, HEIGHT, WIDTH)
    pts = [(p["x"], p["y"], 1) for p in json.loads(pos)] + [(p["x"], p["y"], 0) for p in json.loads(neg or "[]")]
    coords = torch.tensor([[[[x / WIDTH * S, y / HEIGHT * S] for x, y, _ in pts]]])
    labels = torch.tensor([[[lab for _, _, lab in pts]]], dtype=torch.int32)
    with torch.inference_mode():
        pixels = pixel_values(image, S)
        logits, emb = _decode(tracker, pixels, input_points=coords, input_labels=labels)
        for _ in range(iterations - 1):  # then passes on the mask alone
            prompt = F.interpolate(logits, size=(4 * S // tiny_sam3.PATCH,) * 2, mode="bilinear",
                                   align_corners=False, antialias=True)
            logits, _ = _decode(tracker, pixels, emb, input_masks=prompt)
    want = (F.interpolate(logits, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0] > 0).float()
    assert 0 < float(want.sum()) < want.numel()
    differ = (masks != want).float().mean()
    assert differ <= 0.0005, float(differ)
    # points and text together: the point mask first, then the text's, as ComfyUI lists them
    both, boxes_both, _, _ = _run(registry, env, SAM31_FILE, image, text="guitar", positive_coords=pos,
                                  negative_coords=neg, refine_iterations=iterations)
    assert both.shape[0] == 1 + len(boxes_both[0]) and torch.equal(both[0], masks[0])


def test_points_on_a_file_without_the_decoder_and_bad_json(registry, env, image):
    with pytest.raises(NodeError) as err:
        _run(registry, env, PLAIN_FILE, image, positive_coords='[{"x": 3, "y": 4}]')
    assert err.value.input_name == "positive_coords" and "decoder" in str(err.value)
    with pytest.raises(NodeError) as err:
        _run(registry, env, SAM3_FILE, image, negative_coords='[{"x": 3}]')
    assert err.value.input_name == "negative_coords" and "JSON" in str(err.value)


def test_full_size_shapes_give_the_released_decoder_config():
    """A full-size decoder's shapes (Sam3TrackerConfig()'s model on the meta device, in ComfyUI's SAM 3.1
    layout) read back as the released sizes; single-mask choice without the stability fallback (ComfyUI)."""
    from accelerate import init_empty_weights
    from transformers import Sam3Config, Sam3TrackerConfig, Sam3TrackerModel

    from nodes.checkpoint import sam3_tracker

    with init_empty_weights():
        full = Sam3TrackerModel(Sam3TrackerConfig())
    shapes = {k: tuple(v.shape) for k, v in sam3_tracker.to_comfy(full.state_dict(), multiplex=True).items()}
    assert sam3_tracker.present(shapes, multiplex=True) and not sam3_tracker.present(shapes, multiplex=False)
    got = sam3_tracker.tracker_config(shapes, Sam3Config(), multiplex=True)
    for part, names in (("prompt_encoder_config", ("hidden_size", "image_size", "patch_size", "mask_input_channels",
                                                   "num_point_embeddings")),
                        ("mask_decoder_config", ("hidden_size", "mlp_dim", "num_hidden_layers", "num_attention_heads",
                                                 "attention_downsample_rate", "num_multimask_outputs",
                                                 "iou_head_hidden_dim")),
                        ("vision_config", ("fpn_hidden_size", "backbone_feature_sizes"))):
        a, b = getattr(got, part), getattr(full.config, part)
        for name in names:
            assert getattr(a, name) == getattr(b, name), (part, name, getattr(a, name), getattr(b, name))
    assert got.mask_decoder_config.dynamic_multimask_via_stability is False
    assert list(got.vision_config.scale_factors) == [4.0, 2.0, 1.0]


@pytest.mark.parametrize("iterations", [1, 2])
def test_boxes_without_text_equal_the_tracker_run_by_hand(registry, env, tracker, image, iterations):
    from nodes.sam3_nodes import pixel_values

    boxes_in = [{"x": 4.0, "y": 6.0, "width": 20.0, "height": 18.0}, {"x": 30.0, "y": 2.0, "width": 15.0, "height": 30.0}]
    masks, boxes, _, _ = _run(registry, env, SAM3_FILE, image, text=None, bboxes=boxes_in, refine_iterations=iterations)
    assert boxes == [[]] and masks.shape == (2, HEIGHT, WIDTH)
    want = []
    with torch.inference_mode():
        pixels = pixel_values(image, S)
        for d in boxes_in:
            corners = torch.tensor([[[d["x"] / WIDTH * S, d["y"] / HEIGHT * S, (d["x"] + d["width"]) / WIDTH * S,
                                      (d["y"] + d["height"]) / HEIGHT * S]]])
            logits, emb = _decode(tracker, pixels, input_boxes=corners)
            for _ in range(iterations - 1):
                prompt = F.interpolate(logits, size=(4 * S // tiny_sam3.PATCH,) * 2, mode="bilinear",
                                       align_corners=False, antialias=True)
                logits, _ = _decode(tracker, pixels, emb, input_masks=prompt)
            want.append((F.interpolate(logits, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0, 0] > 0)
                        .float())
    want = torch.stack(want)
    assert not torch.equal(want[0], want[1]) and 0 < float(want.mean()) < 1
    differ = (masks != want).float().mean()
    assert differ <= 0.0005, float(differ)
    with pytest.raises(NodeError) as err:  # a file without the decoder cannot
        _run(registry, env, PLAIN_FILE, image, text=None, bboxes=boxes_in)
    assert err.value.input_name == "bboxes" and "decoder" in str(err.value)
