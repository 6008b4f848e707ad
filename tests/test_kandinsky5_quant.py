"""Kandinsky 5's quantised files through the real loaders: Comfy's fp8_scaled (the template's
``qwen_2.5_vl_7b_fp8_scaled`` text encoder; a transformer saved so) and comfy-kitchen's int8_convrot.

Each quantised file has a twin holding its dequantised float32 weights (tests/test_scaled_fp8.py,
tests/test_int8_quant.py write both). Kiln loads the quantised file to the twin's effective weights,
keeping the 8-bit storage, and samples the twin's picture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny_kandinsky5
import tiny_qwen_image
from flow_family_files import env, registry, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.runtime.fp8 import rotation_group

PROMPT = "a fox in the snow"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_int8_quant import quantise_int8
    from test_scaled_fp8 import quantise

    root = tiny_kandinsky5.make_models_folder(tmp_path_factory.mktemp("kandinsky5-quant"))
    scaled, plain = quantise(tiny_kandinsky5.transformer_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "k5-fp8_scaled.safetensors", scaled)
    save_state(root / "diffusion_models" / "k5-fp8-dequant.safetensors", plain)
    int8, twin = quantise_int8(tiny_kandinsky5.transformer_state())
    save_state(root / "diffusion_models" / "k5-int8_convrot.safetensors", int8)
    save_state(root / "diffusion_models" / "k5-int8-dequant.safetensors", twin)
    scaled, plain = quantise(tiny_qwen_image.comfy_text_state())
    save_state(root / "text_encoders" / "qwen_2.5_vl-fp8_scaled.safetensors", scaled)
    save_state(root / "text_encoders" / "qwen_2.5_vl-dequant.safetensors", plain)
    return root


def _image(registry, env, unet: str, qwen: str) -> np.ndarray:
    """tests/test_kandinsky5.py's graph on these files: seed 2, 3 steps, cfg 3.5."""
    from flow_family_files import run
    from test_kandinsky5 import _graph

    from engine.workflow import parse

    graph = _graph(PROMPT, "blurry", 2, 3, 3.5, unet=unet)
    graph["8"]["inputs"]["clip_name1"] = qwen
    return run(registry, env, parse(graph)).results["6"][0].numpy()


def test_quantised_transformers_and_text_encoder_equal_their_dequantised_twins(env):
    from test_int8_quant import _compare as compare_int8
    from test_scaled_fp8 import _compare

    (a,) = call(split_loaders.unet_loader, env, unet_name="k5-fp8_scaled.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="k5-fp8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers, _ = _compare(x, y)
    assert layers >= 20  # every block's linears with their scales
    (a,) = call(split_loaders.unet_loader, env, unet_name="k5-int8_convrot.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="k5-int8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        assert any(rotation_group(m) for m in compare_int8(x, y))  # rotated layers reached the model
    clips = [call(split_loaders.dual_clip_loader, env, clip_name1=name, clip_name2="tiny-clip_l.safetensors",
                  type="kandinsky5_image")[0]
             for name in ("qwen_2.5_vl-fp8_scaled.safetensors", "qwen_2.5_vl-dequant.safetensors")]
    with clips[0].encoder("text_encoder") as x, clips[1].encoder("text_encoder") as y:
        _compare(x, y)
    (ours, _), (theirs, _) = (c.encode(PROMPT)[0] for c in clips)
    assert np.allclose(ours.numpy(), theirs.numpy(), atol=1e-4)


def test_sampling_the_fp8_scaled_files_equals_sampling_their_twins(registry, env):
    ours = _image(registry, env, "k5-fp8_scaled.safetensors", "qwen_2.5_vl-fp8_scaled.safetensors")
    theirs = _image(registry, env, "k5-fp8-dequant.safetensors", "qwen_2.5_vl-dequant.safetensors")
    gap = np.abs(ours - theirs).max()
    assert gap <= 1 / 255, gap
    plain = _image(registry, env, "tiny-kandinsky5.safetensors", "tiny-qwen_2.5_vl.safetensors")
    assert np.abs(ours - plain).max() > max(2 * gap, 1e-4)  # the quantisation is real
