"""SAM 3 text-prompted segmentation: ComfyUI's file through CheckpointLoaderSimple, its CLIP through
CLIPTextEncode, and SAM3_Detect, against transformers' Sam3Model on the same tiny weights.

The reference is transformers' own: Sam3Model.forward on the tokens CLIPTokenizer gives with
SAM 3's 32-token padding, and Sam3ImageProcessor.post_process_instance_segmentation with
ComfyUI's score rule (the query score alone: presence left out, as ComfyUI's node does) and
ComfyUI's best-N choice. The image processor's resize needs torchvision, which this machine
lacks, so the pixels are made the way the node documents (bilinear, mean/std 0.5) and the
same tensor goes to both.
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

SAM3_FILE = "tiny-sam3.safetensors"
SAM31_FILE = "sam3.1_multiplex_fp16.safetensors"
HEIGHT, WIDTH = 40, 52


@pytest.fixture(scope="module")
def net():
    return tiny_sam3.model()


@pytest.fixture(scope="module")
def root(tmp_path_factory, net) -> Path:
    root = tmp_path_factory.mktemp("sam3-models")
    tiny_sam3.save(net, root / "checkpoints" / SAM3_FILE, multiplex=False)
    tiny_sam3.save(net, root / "checkpoints" / SAM31_FILE, multiplex=True)
    return root


def _spec(registry, name):
    return registry.get(name)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, HEIGHT, WIDTH, 3, generator=g)


def _load(registry, env, name=SAM31_FILE):
    record = Called()
    out = call(_spec(registry, "CheckpointLoaderSimple"), env, record, ckpt_name=name)
    return out, record


def _encode(registry, env, clip, text):
    return call(_spec(registry, "CLIPTextEncode"), env, text=text, clip=clip)[0]


def _detect(registry, env, model, image, cond, **kw):
    record = Called()
    args = dict(threshold=0.5, refine_iterations=0, individual_masks=True) | kw
    masks, boxes = call(_spec(registry, "SAM3_Detect"), env, record, model=model, image=image,
                        conditioning=cond, **args)
    return masks, boxes, record


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [SAM3_FILE, SAM31_FILE])
def test_comfy_file_loads_into_sam3model_with_the_same_weights(registry, env, net, name):
    (model, clip, vae), record = _load(registry, env, name)
    assert vae is None and model.family.name == "sam3" and clip.family.name == "sam3"
    assert any(("SAM 3.1" if name == SAM31_FILE else "SAM 3 ") in m for m in record.messages), record.messages
    with model.unet() as loaded:
        got = loaded.state_dict()
        assert loaded.config.vision_config.backbone_config.image_size == tiny_sam3.IMAGE
        assert loaded.config.vision_config.backbone_config.window_size == tiny_sam3.WINDOW
        assert list(loaded.config.vision_config.backbone_config.global_attn_indexes) == tiny_sam3.GLOBAL
        assert loaded.config.text_config.hidden_act == "gelu"
    want = net.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        if name == SAM31_FILE and k.startswith("vision_encoder.neck.fpn_layers.3."):
            assert not got[k].any(), k  # 3.1 has no 0.5 level: Sam3Model computes it and drops it
            continue
        assert torch.equal(got[k], v), k


def test_a_missing_detector_weight_is_a_clear_error(registry, env, net, tmp_path):
    from safetensors.torch import save_file

    state = tiny_sam3.comfy_state(net, multiplex=False)
    del state["detector.transformer.decoder.layers.1.norm3.weight"]
    path = env.paths.models.root / "checkpoints" / "broken-sam3.safetensors"
    save_file(state, str(path))
    with pytest.raises(NodeError) as err:
        _load(registry, env, "broken-sam3.safetensors")
    assert err.value.input_name == "ckpt_name" and "broken-sam3.safetensors: " in str(err.value)
    assert "SAM 3 detector" in str(err.value) and "layers.1.norm3.weight" in str(err.value)
    path.unlink()


# -- the CLIP -----------------------------------------------------------------------------------


def _reference_tokens(text: str):
    from nodes.checkpoint.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    enc = tok(text, padding="max_length", max_length=32, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_clip_text_encode_gives_the_text_towers_states_and_mask(registry, env, net):
    (model, clip, _), _ = _load(registry, env)
    cond = _encode(registry, env, clip, "red guitar")
    emb, extra = cond[0]
    ids, mask = _reference_tokens("red guitar")
    with torch.inference_mode():
        want = net.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(extra["attention_mask"], mask)
    n = int(mask.sum())
    assert emb.shape == (1, 32, tiny_sam3.TEXT_WIDTH)
    torch.testing.assert_close(emb[:, :n], want[:, :n], atol=1e-5, rtol=1e-5)
    other = _encode(registry, env, clip, "blue drum")[0][0]
    assert not torch.allclose(other[:, :n], emb[:, :n])


def test_comma_prompts_and_counts_follow_comfyui(registry, env):
    from nodes.families.sam3 import parse_prompts

    assert parse_prompts("eye:2, (window panels):4,, cat") == [("eye", 2), ("window panels", 4), ("cat", 1)]
    (model, clip, _), _ = _load(registry, env)
    extra = _encode(registry, env, clip, "eye:2, window panels:4")[0][1]
    multi = extra["sam3_multi_cond"]
    assert [m["max_detections"] for m in multi] == [2, 4]
    assert not torch.equal(multi[0]["cond"], multi[1]["cond"])


# -- detection parity ---------------------------------------------------------------------------


def _reference(net, image, text, threshold, max_det):
    """(boxes [N, 4] xyxy px, masks [N, H, W] 0/1, scores) from transformers' Sam3Model, post-processed as
    Sam3ImageProcessor.post_process_instance_segmentation does (its module imports torchvision, absent
    here, so its steps are written out): scores sigmoid (presence left out: ComfyUI's rule), boxes
    times the image size, masks' sigmoid resized bilinearly and taken above 0.5; then ComfyUI's best N."""
    from nodes.sam3_nodes import pixel_values

    ids, mask = _reference_tokens(text)
    with torch.inference_mode():
        out = net(pixel_values=pixel_values(image, tiny_sam3.IMAGE), input_ids=ids, attention_mask=mask)
    scores = out.pred_logits[0].sigmoid()
    keep = scores > threshold
    boxes = out.pred_boxes[0][keep] * torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT])
    masks = F.interpolate(out.pred_masks[0][keep].sigmoid()[None], size=(HEIGHT, WIDTH), mode="bilinear",
                          align_corners=False)[0] > 0.5
    order = scores[keep].argsort(descending=True)[:max_det]
    return boxes[order], masks[order], scores[keep][order]


@pytest.mark.parametrize("text,threshold,max_det", [("guitar", 0.5, 1), ("guitar:3", 0.5, 3),
                                                    ("red car:4", 0.3, 4)])
def test_detect_equals_transformers(registry, env, net, image, text, threshold, max_det):
    (model, clip, _), _ = _load(registry, env)
    masks, boxes, _ = _detect(registry, env, model, image, _encode(registry, env, clip, text), threshold=threshold)
    want_boxes, want_masks, want_scores = _reference(net, image, text.split(":")[0], threshold, max_det)
    assert len(boxes) == 1 and len(boxes[0]) == len(want_boxes) > 0
    got = torch.tensor([[b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]] for b in boxes[0]])
    torch.testing.assert_close(got, want_boxes.float(), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([b["score"] for b in boxes[0]]), want_scores.float(),
                               atol=1e-5, rtol=1e-5)
    assert masks.shape == (len(want_masks), HEIGHT, WIDTH)
    # ComfyUI thresholds the resized logits at 0, transformers the resized sigmoid at 0.5: the same
    # pixels but where bilinear mixing of a sigmoid and of its logit disagree (a mask edge)
    differ = (masks != want_masks.float()).float().mean()
    assert differ <= 0.002, float(differ)


def test_detect_is_not_vacuous(registry, env, net, image):
    (model, clip, _), _ = _load(registry, env)
    cond = _encode(registry, env, clip, "guitar:5")
    _, many, _ = _detect(registry, env, model, image, cond, threshold=0.3)
    _, few, _ = _detect(registry, env, model, image, cond, threshold=0.7)
    assert len(few[0]) < len(many[0])
    _, other, _ = _detect(registry, env, model, image, _encode(registry, env, clip, "a bowl of soup:5"),
                          threshold=0.3)
    assert [b["score"] for b in other[0]] != [b["score"] for b in many[0]]


def test_union_mask_individual_masks_and_refine_note(registry, env, image):
    (model, clip, _), _ = _load(registry, env)
    cond = _encode(registry, env, clip, "guitar:3, lamp:2")
    each, boxes, _ = _detect(registry, env, model, image, cond, threshold=0.3)
    union, boxes2, record = _detect(registry, env, model, image, cond, threshold=0.3, individual_masks=False,
                                    refine_iterations=2)
    assert boxes2 == boxes and len(boxes[0]) == each.shape[0] > 1
    assert union.shape == (1, HEIGHT, WIDTH)
    assert torch.equal(union[0], (each > 0).any(dim=0).float())
    assert any("refine_iterations=2" in m and "tracker" in m for m in record.messages)
    batch = torch.cat([image, image.flip(2)])
    masks, per_image, _ = _detect(registry, env, model, batch, cond, threshold=0.3, individual_masks=False)
    assert masks.shape == (2, HEIGHT, WIDTH) and len(per_image) == 2


def test_boxes_with_text_are_geometry_prompts(registry, env, net, image):
    (model, clip, _), _ = _load(registry, env)
    cond = _encode(registry, env, clip, "guitar:3")
    _, plain, _ = _detect(registry, env, model, image, cond, threshold=0.3)
    box = {"x": 4.0, "y": 6.0, "width": 20.0, "height": 18.0}
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # Sam3Model's box pooling is torchvision's roi_align
        with pytest.raises(NodeError) as err:
            _detect(registry, env, model, image, cond, threshold=0.3, bboxes=[box])
        assert err.value.input_name == "bboxes" and "torchvision" in str(err.value)
        return
    _, boxed, _ = _detect(registry, env, model, image, cond, threshold=0.3, bboxes=[box])
    ids, mask = _reference_tokens("guitar")
    from nodes.sam3_nodes import pixel_values

    cxcywh = torch.tensor([[[(4 + 10) / WIDTH, (6 + 9) / HEIGHT, 20 / WIDTH, 18 / HEIGHT]]])
    with torch.inference_mode():
        out = net(pixel_values=pixel_values(image, tiny_sam3.IMAGE), input_ids=ids, attention_mask=mask,
                  input_boxes=cxcywh)
    probs = out.pred_logits[0].sigmoid()
    want = sorted(float(p) for p in probs[probs > 0.3])[::-1][:3]
    torch.testing.assert_close(torch.tensor([b["score"] for b in boxed[0]]), torch.tensor(want), atol=1e-5,
                               rtol=1e-5)
    assert [b["score"] for b in boxed[0]] != [b["score"] for b in plain[0]]


# -- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_name_the_input(registry, env, image):
    from nodes.families import by_name
    from nodes.handles import ModelHandle

    (model, clip, _), _ = _load(registry, env)
    cond = _encode(registry, env, clip, "guitar")
    sd1 = ModelHandle(family=by_name("sd1"), scheduler_config={}, latent=by_name("sd1").latent)
    with pytest.raises(NodeError) as err:
        _detect(registry, env, sd1, image, cond)
    assert err.value.input_name == "model" and "SAM 3" in str(err.value)
    foreign = [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 32)}]]
    with pytest.raises(NodeError) as err:
        _detect(registry, env, model, image, foreign)
    assert err.value.input_name == "conditioning" and "another CLIP" in str(err.value)
    for empty in ("", " , ()"):
        with pytest.raises(NodeError) as err:
            _encode(registry, env, clip, empty)
        assert err.value.input_name == "text" and "empty" in str(err.value)
    with pytest.raises(NodeError) as err:
        _detect(registry, env, model, image, cond, positive_coords='[{"x": 3, "y": 4}]')
    assert err.value.input_name == "positive_coords" and "tracker" in str(err.value)
    with pytest.raises(NodeError) as err:
        _detect(registry, env, model, image, None)
    assert err.value.input_name == "conditioning"


def test_full_size_shapes_give_the_released_config():
    """A full-size file's shapes (Sam3Config()'s model on the meta device, in ComfyUI's layout, no RoPE
    tables) read back as SAM 3's released configuration, the sizes shapes cannot tell included."""
    import torch
    from transformers import Sam3Config, Sam3Model

    from nodes.checkpoint.sam3_keys import comfy_name, to_comfy
    from nodes.checkpoint.sam3_load import sam3_config

    with torch.device("meta"):  # transformers skips initialising what the meta device holds
        full = Sam3Model(Sam3Config())
    state = full.state_dict()
    comfy = to_comfy(state)
    assert {comfy_name(k, state) for k in state} == set(comfy)  # error messages name the file's keys
    got = sam3_config({k: tuple(v.shape) for k, v in comfy.items()})
    want = full.config
    for part, names in (("vision_config.backbone_config", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "intermediate_size", "image_size", "patch_size",
                                                           "window_size", "global_attn_indexes",
                                                           "pretrain_image_size")),
                        ("vision_config", ("fpn_hidden_size", "backbone_feature_sizes", "scale_factors")),
                        ("text_config", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "intermediate_size", "max_position_embeddings", "projection_dim",
                                         "hidden_act", "vocab_size")),
                        ("detr_decoder_config", ("hidden_size", "num_layers", "num_queries", "num_attention_heads",
                                                 "intermediate_size")),
                        ("detr_encoder_config", ("num_layers", "num_attention_heads", "intermediate_size")),
                        ("geometry_encoder_config", ("num_layers", "num_attention_heads", "intermediate_size")),
                        ("mask_decoder_config", ("num_upsampling_stages", "num_attention_heads"))):
        a, b = got, want
        for attr in part.split("."):
            a, b = getattr(a, attr), getattr(b, attr)
        for name in names:
            assert getattr(a, name) == getattr(b, name), (part, name, getattr(a, name), getattr(b, name))


def test_fp16_file_and_long_prompts(registry, env, net):
    """ComfyUI ships the file in fp16: it loads to those fp16 weights in the manager's float32. A prompt past
    30 tokens takes a second 32-token window, encoded on its own and concatenated with its mask."""
    from safetensors.torch import save_file

    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny_sam3.comfy_state(net, True).items()}
    save_file(state, str(env.paths.models.root / "checkpoints" / "half-sam3.safetensors"))
    (model, clip, _), _ = _load(registry, env, "half-sam3.safetensors")
    with model.unet() as loaded:
        got = loaded.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("vision_encoder.neck.fpn_layers.3."):
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v.half().float()), k
    long = " ".join(["red guitar on a wooden stage"] * 6)
    cond = _encode(registry, env, clip, long)
    emb, mask = cond[0][0], cond[0][1]["attention_mask"]
    assert emb.shape[1] == 64 and mask.shape == (1, 64) and int(mask[0, :32].sum()) == 32
    first = _encode(registry, env, clip, " ".join(long.split()[:30]))  # not the same words: windows are tokens
    assert 2 < int(mask[0, 32:].sum()) < 32 and first[0][0].shape[1] == 32
