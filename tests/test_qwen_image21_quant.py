"""Qwen-Image 2.1's quantised files through the real loaders: comfy-kitchen's int8 (``qwen_image_2.1_int8_convrot``,
``qwen3vl_8b_int8_convrot``) and Comfy's fp8_scaled.

Each quantised file has a twin holding its dequantised float32 weights (tests/test_int8_quant.py,
tests/test_scaled_fp8.py write both). Kiln must load the quantised file to the twin's effective
weights, keeping the 8-bit storage: the fused ``gate_up``'s row scales split with it into
``gate_layer`` and ``proj``; and sample the twin's picture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_qwen_image21 as tiny
from flow_family_files import env, registry, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.runtime.fp8 import rotation_group


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_int8_quant import quantise_int8
    from test_scaled_fp8 import quantise

    root = tiny.make_models_folder(tmp_path_factory.mktemp("qwen21-quant"))
    files = (("diffusion_models", "qwen21-int8_convrot", "qwen21-int8-dequant", quantise_int8, tiny.original_state(),
              "model.diffusion_model."),
             ("diffusion_models", "qwen21-fp8_scaled", "qwen21-fp8-dequant", quantise, tiny.original_state(), ""),
             ("text_encoders", "qwen3vl_8b-int8_convrot", "qwen3vl_8b-int8-dequant", quantise_int8,
              tiny.comfy_text_state(), ""))
    for folder, name, twin_name, make, state, prefix in files:
        quantised, twin = make(state, prefix)
        save_state(root / folder / f"{name}.safetensors", quantised)
        save_state(root / folder / f"{twin_name}.safetensors", twin)
    return root


def test_int8_convrot_transformer_and_text_encoder_equal_their_twins(env, root):
    from test_int8_quant import _compare

    (a,) = call(split_loaders.unet_loader, env, unet_name="qwen21-int8_convrot.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="qwen21-int8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers = _compare(x, y)
        split = [n for n, m in x.named_modules() if n.endswith(("img_mlp.gate_layer", "img_mlp.proj"))
                 and m.weight.dtype == torch.int8]
    assert any(rotation_group(m) for m in layers) and split  # a fused gate_up's scales followed the split
    (c,) = call(split_loaders.clip_loader, env, clip_name="qwen3vl_8b-int8_convrot.safetensors", type="qwen_image")
    (d,) = call(split_loaders.clip_loader, env, clip_name="qwen3vl_8b-int8-dequant.safetensors", type="qwen_image")
    with c.encoder("text_encoder") as x, d.encoder("text_encoder") as y:
        _compare(x, y)
    assert torch.allclose(c.encode("a fox")[0][0], d.encode("a fox")[0][0], atol=1e-4)


def test_fp8_scaled_transformer_equals_its_twin(env):
    from test_scaled_fp8 import _compare

    (a,) = call(split_loaders.unet_loader, env, unet_name="qwen21-fp8_scaled.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="qwen21-fp8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers, _ = _compare(x, y)
    assert layers >= 8


def test_sampling_the_int8_file_equals_sampling_its_twin(registry, env):
    from test_qwen_image21 import _graph, _run

    ours = _run(registry, env, _graph("a fox", "", 2, 3, 1.0, unet="qwen21-int8_convrot.safetensors"))
    theirs = _run(registry, env, _graph("a fox", "", 2, 3, 1.0, unet="qwen21-int8-dequant.safetensors"))
    gap = np.abs(ours - theirs).max()
    print(f"int8 gap {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    plain = _run(registry, env, _graph("a fox", "", 2, 3, 1.0))
    assert np.abs(ours - plain).max() > max(2 * gap, 1e-4)  # the quantisation is real
