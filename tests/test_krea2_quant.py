"""Krea 2's quantised files through the real loaders: Comfy's fp8_scaled (``krea2_turbo_fp8_scaled``,
``qwen3vl_4b_fp8_scaled``) and comfy-kitchen's int8 (``krea2_turbo_int8_convrot``).

Each quantised file has a twin holding its dequantised float32 weights (written by the same code as
the other families' quantisation tests: tests/test_scaled_fp8.py, tests/test_int8_quant.py). Kiln must
load the quantised file to the twin's effective weights while keeping the 8-bit storage (the scales
follow Krea 2's key renames), and sample the twin's picture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_krea2
from flow_family_files import env, registry, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.runtime.fp8 import rotation_group

PROMPT = "a fox in the snow"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_int8_quant import quantise_int8
    from test_scaled_fp8 import quantise

    root = tiny_krea2.make_models_folder(tmp_path_factory.mktemp("krea2-quant"))
    scaled, plain = quantise(tiny_krea2.original_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "krea2-fp8_scaled.safetensors", scaled)
    save_state(root / "diffusion_models" / "krea2-fp8-dequant.safetensors", plain)
    int8, twin = quantise_int8(tiny_krea2.original_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "krea2-int8_convrot.safetensors", int8)
    save_state(root / "diffusion_models" / "krea2-int8-dequant.safetensors", twin)
    scaled, plain = quantise(tiny_krea2.comfy_text_state())
    save_state(root / "text_encoders" / "qwen3vl-fp8_scaled.safetensors", scaled)
    save_state(root / "text_encoders" / "qwen3vl-dequant.safetensors", plain)
    return root


def _image(registry, env, unet: str, clip: str) -> np.ndarray:
    """ComfyUI's Turbo graph (tests/test_krea2.py) on these files: seed 2, 4 steps, cfg 1, zeroed negative."""
    from test_krea2 import _graph, _run

    return _run(registry, env, _graph(PROMPT, None, 2, 4, 1.0, unet=unet, clip=clip))


def test_fp8_scaled_transformer_and_text_encoder_equal_their_dequantised_twins(env):
    from test_scaled_fp8 import _compare

    (a,) = call(split_loaders.unet_loader, env, unet_name="krea2-fp8_scaled.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="krea2-fp8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers, _ = _compare(x, y)
    assert layers >= 20  # every block's and the text fusion's linears, renamed with their scales
    (c,) = call(split_loaders.clip_loader, env, clip_name="qwen3vl-fp8_scaled.safetensors", type="krea2")
    (d,) = call(split_loaders.clip_loader, env, clip_name="qwen3vl-dequant.safetensors", type="krea2")
    with c.encoder("text_encoder") as x, d.encoder("text_encoder") as y:
        _compare(x, y)
    assert torch.allclose(c.encode(PROMPT)[0][0], d.encode(PROMPT)[0][0], atol=1e-4)


def test_int8_convrot_transformer_equals_comfy_kitchens_dequantisation(env):
    from test_int8_quant import _compare

    (a,) = call(split_loaders.unet_loader, env, unet_name="krea2-int8_convrot.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="krea2-int8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers = _compare(x, y)
    assert any(rotation_group(m) for m in layers)  # rotated layers reached the model


@pytest.mark.parametrize("unet,twin,clip,twin_clip", [
    ("krea2-fp8_scaled.safetensors", "krea2-fp8-dequant.safetensors", "qwen3vl-fp8_scaled.safetensors",
     "qwen3vl-dequant.safetensors"),
    ("krea2-int8_convrot.safetensors", "krea2-int8-dequant.safetensors", "tiny-qwen3vl_4b.safetensors",
     "tiny-qwen3vl_4b.safetensors")], ids=["fp8_scaled", "int8_convrot"])
def test_sampling_a_quantised_file_equals_sampling_its_twin(registry, env, unet, twin, clip, twin_clip):
    ours, theirs = _image(registry, env, unet, clip), _image(registry, env, twin, twin_clip)
    gap = np.abs(ours - theirs).max()
    print(f"{unet}: {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    plain = _image(registry, env, "tiny-krea2.safetensors", "tiny-qwen3vl_4b.safetensors")
    print(f"vs unquantised {np.abs(ours - plain).max() * 255:.4f}/255")
    assert np.abs(ours - plain).max() > max(2 * gap, 1e-4)  # the quantisation is real: the bf16 file samples otherwise
