"""HiDream-I1 on a tiny random model, from ComfyUI's split files through the real loaders, against
HiDreamImagePipeline.

The tiny HiDream (tests/tiny_hidream.py) is written as ComfyUI's files under the template's names:
CLIP-L and CLIP-G (long CLIPs, 248 positions) with their projections, T5's encoder, Llama 3.1 as a
causal-LM file (``model.*`` and ``lm_head``). QuadrupleCLIPLoader loads them in any order; the
conditioning equals the pipeline's ``encode_prompt``.
"""
from __future__ import annotations

import pytest
import torch

import tiny_hidream
from engine.context import NodeError
from flow_family_files import env, models_root, registry  # noqa: F401 (fixtures)
from node_call import call
from nodes import hidream_nodes
from nodes.families import hidream

PROMPT = "a red barn in a field"

root = models_root(tiny_hidream.make_models_folder, "hidream-models")


@pytest.fixture(scope="module")
def pipe():
    return tiny_hidream.pipeline()


def _quadruple(env, names=tiny_hidream.TEXTS):
    return call(hidream_nodes.quadruple_clip_loader, env, **dict(zip(hidream_nodes.CLIP_INPUTS, names)))[0]


def test_the_four_files_load_to_the_pipelines_weights_in_any_order(env):
    clip = _quadruple(env, tuple(reversed(tiny_hidream.TEXTS)))
    assert clip.family is hidream.FAMILY
    parts = tiny_hidream.components()
    for module in hidream.MODULES:
        want = parts[module].state_dict()
        with clip.encoder(module) as built:
            got = built.state_dict()
        prefix = "model." if module == "text_encoder_4" else ""
        shared = [k for k in got if prefix + k in want]
        assert len(shared) >= len(got) - 1, (module, sorted(set(got) - {k for k in shared})[:5])
        assert all(torch.equal(got[k], want[prefix + k]) for k in shared), module


@pytest.mark.parametrize("prompt", [PROMPT, "", "a long prompt, " * 60])
def test_conditioning_equals_hidream_pipelines_encode_prompt(env, pipe, prompt):
    """T5's states, every Llama layer's (batch first, as ComfyUI keeps them) and the two CLIPs' pooled
    outputs side by side, each as encode_prompt gives it at 128 tokens (a long prompt cut there)."""
    clip = _quadruple(env)
    [[t5, extra]] = clip.encode(prompt)
    with torch.no_grad():
        want_t5, _, want_llama, _, want_pooled, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=torch.device("cpu"))
    assert t5.shape == want_t5.shape == (1, hidream.TOKENS, tiny_hidream.T5)
    assert torch.allclose(t5, want_t5.float(), atol=1e-5, rtol=1e-5)
    llama = extra[hidream.LLAMA]
    assert llama.shape == (1, tiny_hidream.LLAMA_LAYERS, hidream.TOKENS, tiny_hidream.LLAMA)
    assert torch.allclose(llama, want_llama.movedim(0, 1).float(), atol=1e-5, rtol=1e-5)
    pooled = extra["pooled_output"]
    assert pooled.shape == want_pooled.shape == (1, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G)
    assert torch.allclose(pooled, want_pooled.float(), atol=1e-5, rtol=1e-5)


def test_the_prompt_matters_to_every_part(env):
    clip = _quadruple(env)
    [[a, ea]], [[b, eb]] = clip.encode(PROMPT), clip.encode("a blue car")
    assert (a - b).abs().max() > 1e-3
    assert (ea[hidream.LLAMA] - eb[hidream.LLAMA]).abs().max() > 1e-3
    assert (ea["pooled_output"] - eb["pooled_output"]).abs().max() > 1e-3


def test_a_missing_encoder_names_the_kind_and_the_input(env):
    names = list(tiny_hidream.TEXTS)
    names[3] = names[2]  # T5 twice, no Llama
    with pytest.raises(NodeError, match="Llama 3.1") as info:
        _quadruple(env, names)
    assert info.value.input_name in hidream_nodes.CLIP_INPUTS
