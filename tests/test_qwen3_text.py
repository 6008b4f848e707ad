"""nodes.checkpoint.qwen3_text: a Qwen3 text encoder from ComfyUI-style files (bf16, fp8, scaled fp8).

Each file is a tiny random Qwen3 (tests/tiny_qwen3.py) saved under the causal-LM keys ComfyUI's
``qwen_3_4b*.safetensors`` use. The loaded model must hold the file's tensors bit for bit (fp8 kept
fp8) and give every layer's hidden states equal to transformers' own model built from the same
effective weights; files of other encoders are refused by name.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_qwen3
from nodes.checkpoint.load import CheckpointError, open_state
from nodes.checkpoint.qwen3_text import build_qwen3, hidden_states, is_qwen3
from nodes.runtime.fp8 import cast_linear_class, weight_scale
from test_scaled_fp8 import quantise

FP8 = torch.float8_e4m3fn


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of token ids, the second padded on the right (mask 0), as an image pipeline batches them."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _reference(state: dict) -> torch.nn.Module:
    """transformers' Qwen3 causal LM with ``state`` (float32) as its weights."""
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM(tiny_qwen3.model().config).eval()
    ref.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return ref


def _save(tmp_path: Path, name: str, state: dict) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _all_states(model, ids, mask) -> tuple:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_file_loads_bit_exactly_and_every_hidden_layer_equals_transformers(tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in tiny_qwen3.file_state().items()}
    path = _save(tmp_path, f"qwen_3_4b_{str(dtype)[6:]}.safetensors", state)
    assert is_qwen3(open_state(path).keys())
    model = build_qwen3(open_state(path), path.name, torch.float32)
    assert model.config.head_dim == 16 and model.config.num_key_value_heads == 2
    assert model.config.num_hidden_layers == 3
    own = model.state_dict()
    assert set(own) == {k[len("model."):] for k in state if k.startswith("model.")}  # lm_head dropped
    for k, v in state.items():
        if k.startswith("model."):
            held = own[k[len("model."):]]
            assert torch.equal(held.to(dtype), v), k  # the file's very values (bf16 linears kept bf16)
    ids, mask = _ids()
    ref = _all_states(_reference(state).model, ids, mask)
    with torch.no_grad():
        got = [hidden_states(model, ids, mask, i) for i in range(len(ref))]
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"hidden layer {i}"
    assert not torch.equal(got[-2], got[-1])  # the layers differ: the index chosen matters


def test_an_fp8_file_stays_fp8_and_equals_its_upcast_weights(tmp_path):
    state = {k: v.to(FP8) if v.ndim == 2 and "layers." in k else v for k, v in tiny_qwen3.file_state().items()}
    path = _save(tmp_path, "qwen_3_4b_fp8_e4m3fn.safetensors", state)
    model = build_qwen3(open_state(path), path.name, torch.float32)
    q = model.layers[0].self_attn.q_proj
    assert q.weight.dtype == FP8 and type(q) is cast_linear_class()
    ids, mask = _ids()
    ref = _all_states(_reference(state).model, ids, mask)[-2]
    with torch.no_grad():
        assert torch.equal(hidden_states(model, ids, mask, -2), ref)


def test_a_comfy_scaled_fp8_file_gets_its_scales(tmp_path):
    scaled, plain = quantise(tiny_qwen3.file_state(lm_head=False))
    path = _save(tmp_path, "qwen_3_4b_fp8_scaled.safetensors", scaled)
    model = build_qwen3(open_state(path), path.name, torch.float32)
    down = model.layers[1].mlp.down_proj
    assert down.weight.dtype == FP8 and weight_scale(down) is not None
    ids, mask = _ids()
    plain["lm_head.weight"] = tiny_qwen3.file_state()["lm_head.weight"]
    ref = _all_states(_reference(plain).model, ids, mask)[-2]
    with torch.no_grad():
        got = hidden_states(model, ids, mask, -2)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), float((got - ref).abs().max())
    unscaled = build_qwen3({k: v for k, v in scaled.items() if "scale" not in k}, "unscaled", torch.float32)
    with torch.no_grad():  # not vacuous: without the scales the states are far off
        assert not torch.allclose(hidden_states(unscaled, ids, mask, -2), ref, atol=1e-2)


def test_a_bare_qwen3model_file_and_a_folder_config_load_too(tmp_path):
    state = {k[len("model."):]: v for k, v in tiny_qwen3.file_state(lm_head=False).items()}
    path = _save(tmp_path, "text_encoder.safetensors", state)
    config = tiny_qwen3.model().config
    model = build_qwen3(open_state(path), path.name, torch.float32, config=config)
    assert torch.equal(model.norm.weight, state["norm.weight"])


@pytest.mark.parametrize("kind", ["t5", "clip", "qwen25vl", "truncated"])
def test_other_files_are_refused_by_name(tmp_path, kind):
    if kind == "t5":
        state = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4), "shared.weight": torch.zeros(8, 4)}
        words = "T5"
    elif kind == "clip":
        state = {"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}
        words = "CLIP"
    elif kind == "qwen25vl":
        state = {k: v for k, v in tiny_qwen3.file_state().items() if "q_norm" not in k and "k_norm" not in k}
        state["visual.blocks.0.attn.qkv.weight"] = torch.zeros(4, 4)
        words = "Qwen2.5-VL"
    else:
        state = {k: v for k, v in tiny_qwen3.file_state().items() if "mlp.gate_proj" not in k}
        words = "mlp.gate_proj"
    path = _save(tmp_path, f"not_qwen3_{kind}.safetensors", state)
    with pytest.raises(CheckpointError, match=f"not_qwen3_{kind}.safetensors") as err:
        build_qwen3(open_state(path), path.name, torch.float32)
    assert words in str(err.value)
    assert ("Qwen3" in str(err.value)) or kind == "truncated"
