"""ComfyUI's ModelMergeQwenImage and ModelMergeWAN2_1 on tiny transformers: each weight takes the ratio of
the block its ComfyUI name is under (Wan's original layout, Qwen-Image's diffusers names), the models are
bit-identical afterwards, and another family is refused naming model1."""
from __future__ import annotations

import pytest
import torch

from engine.context import NodeError
from node_call import call, model_in_memory
from nodes import model_merging as mm


def _merged(node, blocks, family, a, b, ratios: dict[str, float]) -> tuple[dict, dict, dict]:
    w1 = {k: v.detach().clone() for k, v in a.named_parameters()}
    w2 = {k: v.detach().clone() for k, v in b.named_parameters()}
    (merged,) = call(node, None, model1=model_in_memory(family, a), model2=model_in_memory(family, b),
                     **{**{block: 1.0 for block in blocks}, **ratios})
    with merged.unet() as net:
        got = {k: v.detach().clone() for k, v in net.named_parameters()}
    assert all(torch.equal(p, w1[k]) for k, p in a.named_parameters())  # restored
    return got, w1, w2


def _check(got: dict, w1: dict, w2: dict, expected: dict[str, float]) -> None:
    for name, r in expected.items():
        assert not torch.allclose(w1[name], w2[name]), name  # each check can fail
        assert torch.allclose(got[name], r * w1[name] + (1 - r) * w2[name], atol=1e-6), name


def test_model_merge_qwen_image_takes_each_block_s_ratio():
    import tiny_qwen_image

    from nodes.families import qwen_image

    a = tiny_qwen_image.build(seed=0)["transformer"]
    b = tiny_qwen_image.build(seed=1)["transformer"]
    got, w1, w2 = _merged(mm.model_merge_qwen_image, mm.QWEN_IMAGE_BLOCKS, qwen_image.FAMILY, a, b,
                          {"pos_embeds.": 0.9, "img_in.": 0.1, "txt_in.": 0.2, "time_text_embed.": 0.3,
                           "transformer_blocks.0.": 0.4, "proj_out.": 0.5})
    _check(got, w1, w2, {"img_in.weight": 0.1, "txt_in.weight": 0.2,
                         "time_text_embed.timestep_embedder.linear_1.weight": 0.3,
                         "transformer_blocks.0.attn.to_q.weight": 0.4, "transformer_blocks.0.img_mod.1.weight": 0.4,
                         "transformer_blocks.1.attn.to_q.weight": 1.0, "proj_out.weight": 0.5,
                         "norm_out.linear.weight": 0.9})  # under no block: the first input's ratio


def test_model_merge_wan2_1_addresses_the_original_layout_and_refuses_another_family():
    import tiny_qwen_image
    import tiny_wan

    from nodes.families import qwen_image, wan

    a = tiny_wan.build(seed=0)["transformer"]
    b = tiny_wan.build(seed=1)["transformer"]
    names = wan.FAMILY.original_names(a)
    assert names["condition_embedder.time_embedder.linear_1.weight"].startswith("time_embedding.")
    got, w1, w2 = _merged(mm.model_merge_wan2_1, mm.WAN21_BLOCKS, wan.FAMILY, a, b,
                          {"patch_embedding.": 0.1, "time_embedding.": 0.2, "time_projection.": 0.3,
                           "text_embedding.": 0.4, "img_emb.": 0.5, "blocks.1.": 0.6, "head.": 0.7})
    _check(got, w1, w2, {"patch_embedding.weight": 0.1, "condition_embedder.time_embedder.linear_1.weight": 0.2,
                         "condition_embedder.time_proj.weight": 0.3,
                         "condition_embedder.text_embedder.linear_1.weight": 0.4,
                         "condition_embedder.image_embedder.ff.net.0.proj.weight": 0.5,
                         "blocks.0.attn1.to_q.weight": 1.0, "blocks.1.attn1.to_q.weight": 0.6,
                         "blocks.1.attn2.add_k_proj.weight": 0.6, "proj_out.weight": 0.7})

    other = tiny_qwen_image.build(seed=0)["transformer"]
    with pytest.raises(NodeError) as err:
        call(mm.model_merge_wan2_1, None, model1=model_in_memory(qwen_image.FAMILY, other),
             model2=model_in_memory(qwen_image.FAMILY, other), **{k: 1.0 for k in mm.WAN21_BLOCKS})
    assert err.value.input_name == "model1" and "wan21" in str(err.value)
