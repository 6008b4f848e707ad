"""ComfyUI's attention-multiply nodes on the tiny SD1 loaded through the real loader.

The claims: while the patched model is in use exactly the named projections' weights and
biases are multiplied by their factors (self-attention attn1 or cross-attention attn2; the
text encoders' self_attn), nothing else changes, and the model is restored afterwards;
factors of 1 give the handle back; the result samples and encodes differently; a model with
no such layers is refused naming its input.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from engine.context import NodeError
from node_call import call, model_in_memory
from nodes import attention_multiply as am
from nodes import loaders, text


def _state(use) -> dict[str, torch.Tensor]:
    with use() as net:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("node,layer", [(am.unet_self_attention_multiply, "attn1"),
                                        (am.unet_cross_attention_multiply, "attn2")])
def test_unet_projections_are_scaled_and_nothing_else(tiny_env, node, layer):
    model, _, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    before = _state(model.unet)
    assert call(node, tiny_env, model=model, q=1.0, k=1.0, v=1.0, out=1.0)[0] is model
    (patched,) = call(node, tiny_env, model=model, q=0.5, k=2.0, v=1.0, out=3.0)
    after = _state(patched.unet)
    factors = {f"{layer}.to_q.": 0.5, f"{layer}.to_k.": 2.0, f"{layer}.to_out.0.": 3.0}
    scaled = 0
    for name, value in before.items():
        factor = next((f for ending, f in factors.items() if ending in name), 1.0)
        assert torch.equal(after[name], value * factor) if factor != 1.0 else torch.equal(after[name], value), name
        scaled += factor != 1.0
    assert scaled >= 3
    assert all(torch.equal(v, _state(model.unet)[k]) for k, v in before.items())  # restored


def test_clip_projections_change_the_encoding(tiny_env):
    _, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    before = _state(lambda: clip.encoder("text_encoder"))
    (patched,) = call(am.clip_attention_multiply, tiny_env, clip=clip, q=1.0, k=1.0, v=1.5, out=1.0)
    after = _state(lambda: patched.encoder("text_encoder"))
    for name, value in before.items():
        factor = 1.5 if "self_attn.v_proj." in name else 1.0
        assert torch.equal(after[name], value * factor), name

    def encode(c):
        return call(text.clip_text_encode, tiny_env, text="a cat", clip=c)[0][0][0]

    assert (encode(patched) - encode(clip)).abs().max() > 1e-3


def test_a_model_without_such_layers_is_refused():
    from nodes.families import flux

    model = model_in_memory(flux.FAMILY, torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(NodeError) as err:
        call(am.unet_cross_attention_multiply, None, model=model, q=2.0, k=1.0, v=1.0, out=1.0)
    assert err.value.input_name == "model"
    with pytest.raises(NodeError) as err:
        call(am.clip_attention_multiply, None, clip=model, q=2.0, k=1.0, v=1.0, out=1.0)
    assert err.value.input_name == "clip"
