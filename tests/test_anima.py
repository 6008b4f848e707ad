"""Anima on tiny random files: the LLM adapter against a hand-built forward, the DiT against diffusers'
CosmosTransformer3DModel on the same weights, and ComfyUI's Anima template run end to end.

There is no diffusers Anima pipeline, so the adapter is checked against the facts (nodes.checkpoint.anima_adapter):
one block computed here by hand from its weights (RMSNorms, RoPE on both streams, attention, the GELU MLP),
the shapes the DiT reads (a row per T5 token, zero-padded to 512), and that each input matters.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tiny_anima
import tiny_cosmos
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, models_root, registry, template, unet_weights  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.checkpoint.anima_adapter import LLMAdapter
from nodes.families import anima

root = models_root(tiny_anima.make_models_folder, "anima-models")
SIZE = 64


# -- the adapter, by hand ------------------------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight


def _rotated(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, head] rotated at positions 0.. as complex pairs (i, i + head/2) by angle pos * 10000^(-2i/head)."""
    half = x.shape[-1] // 2
    pos = torch.arange(x.shape[0], dtype=torch.float64)[:, None]
    angle = pos * 10000.0 ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    z = torch.complex(x[:, :half].double(), x[:, half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).float()


def _attention(p: dict, prefix: str, x: torch.Tensor, src: torch.Tensor, heads: int) -> torch.Tensor:
    q = x @ p[prefix + "q_proj.weight"].T
    k, v = src @ p[prefix + "k_proj.weight"].T, src @ p[prefix + "v_proj.weight"].T
    head = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * head, (h + 1) * head)
        qh = _rotated(_rms(q[:, sl], p[prefix + "q_norm.weight"]))
        kh = _rotated(_rms(k[:, sl], p[prefix + "k_norm.weight"]))
        weights = torch.softmax(qh @ kh.T / math.sqrt(head), dim=-1)
        outs.append(weights @ v[:, sl])
    return torch.cat(outs, dim=-1) @ p[prefix + "o_proj.weight"].T


def _by_hand(module: LLMAdapter, source: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One-prompt adapter forward written from the facts, every block."""
    p = {k: v.float() for k, v in module.state_dict().items()}
    x = p["embed.weight"][ids]
    for n in range(len(module.blocks)):
        b = f"blocks.{n}."
        normed = _rms(x, p[b + "norm_self_attn.weight"])
        x = x + _attention(p, b + "self_attn.", normed, normed, module.heads)
        x = x + _attention(p, b + "cross_attn.", _rms(x, p[b + "norm_cross_attn.weight"]), source, module.heads)
        normed = _rms(x, p[b + "norm_mlp.weight"])
        hidden = torch.nn.functional.gelu(normed @ p[b + "mlp.0.weight"].T + p[b + "mlp.0.bias"])
        x = x + hidden @ p[b + "mlp.2.weight"].T + p[b + "mlp.2.bias"]
    return _rms(x @ p["out_proj.weight"].T + p["out_proj.bias"], p["norm.weight"])


def test_the_adapter_is_the_hand_built_forward():
    module = tiny_anima.adapter()
    g = torch.Generator().manual_seed(0)
    source, ids = torch.randn(1, 7, 48, generator=g), torch.randint(0, 32128, (1, 5), generator=g)
    with torch.no_grad():
        ours = module(source, ids)
    assert ours.shape == (1, 5, tiny_cosmos.TEXT)
    assert torch.allclose(ours[0], _by_hand(module, source[0], ids[0]), atol=1e-5)
    with torch.no_grad():  # each input matters: the Qwen3 states through cross-attention, the ids and their order
        assert (module(source * 0.5, ids) - ours).abs().max() > 1e-3
        assert (module(source, ids.flip(1)) - ours.flip(1)).abs().max() > 1e-3  # positions are rotated in


# -- loading and the DiT --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-anima.safetensors", "tiny-anima-prefixed.safetensors",
                                  "tiny-anima-diffusers-keys.safetensors"])
def test_every_layout_loads_dit_and_adapter_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is anima.FAMILY
    got = unet_weights(model)
    want = {**tiny_cosmos.components()["transformer"].state_dict(),
            **{"llm_adapter." + k: v for k, v in tiny_anima.adapter().state_dict().items()}}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_the_dit_is_diffusers_cosmos_transformer_on_the_adapters_context(env):
    """Kiln's Anima call (adapter, 512-token zero padding, Cosmos' call) equals diffusers' CosmosTransformer3DModel
    holding the same DiT weights, given that padded adapter output."""
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-anima.safetensors")
    (clip,) = call(split_loaders.clip_loader, env, clip_name="qwen_3_06b_base.safetensors", type="stable_diffusion")
    assert clip.family is anima.FAMILY
    states, extra = clip.encode("a cat in a hat")[0]
    ids = extra[anima.T5_IDS]
    assert states.shape[-1] == 48 and ids[0, -1] == 1  # Qwen3's width; T5's end token closes the ids
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.7])
    with model._use_unet() as net, torch.no_grad():
        wrapped = anima.FAMILY.wrap_network(net)
        ours = wrapped(x, t, states, t5_ids=[ids])[0]
        context = net.llm_adapter(states, ids)
        assert context.shape == (1, ids.shape[1], tiny_cosmos.TEXT)
        padded = torch.nn.functional.pad(context, (0, 0, 0, 512 - context.shape[1]))
        theirs = tiny_cosmos.components()["transformer"](
            x.unsqueeze(2), timestep=t, encoder_hidden_states=padded, padding_mask=torch.zeros(1, 1, 8, 8),
            return_dict=False)[0].squeeze(2)
    assert torch.allclose(ours, theirs, atol=1e-5)
    with torch.no_grad():
        assert (wrapped(x, t, states, t5_ids=[ids[:, :2]])[0] - ours).abs().max() > 1e-3  # the T5 ids matter


@pytest.mark.parametrize("lora_name", ["anima-turbo-lora-v0.2.safetensors", "tiny-anima-kohya.safetensors"])
def test_lora_model_only_equals_the_weights_merged_by_hand(env, lora_name):
    from nodes import lora

    def unet_weights(model) -> dict:  # while the model holds its patches
        with model.unet() as net:
            return {k: v.detach().clone() for k, v in net.state_dict().items()}

    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-anima.safetensors")
    base = unet_weights(model)
    for strength in (1.0, 0.5):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=lora_name, strength_model=strength)
        got = unet_weights(patched)
        for module, (down, up) in tiny_anima.lora_factors().items():
            param = tiny_anima.LORA_MODULES[module]
            assert torch.allclose(got[param], base[param] + strength * up @ down, atol=1e-6), param
        moved = {k for k in base if not torch.equal(got[k], base[k])}
        assert moved == set(tiny_anima.LORA_MODULES.values())
    assert all(torch.equal(v, base[k]) for k, v in unet_weights(model).items())  # the loaded model is unchanged


def test_prompt_weights_scale_the_adapters_t5_rows(env):
    """ComfyUI's Anima encoder: the Qwen3 side reads the text without the syntax (each weighted piece tokenized on
    its own, weights 1), each T5 token carries its weight, and the adapter's row of that token is multiplied by it."""
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer

    (clip,) = call(split_loaders.clip_loader, env, clip_name="qwen_3_06b_base.safetensors", type="stable_diffusion")
    plain = clip.encode("a cat in a hat")[0][1]
    states, extra = clip.encode("a (cat:1.5) in a hat")[0]
    qwen = clip.tokenizers["tokenizer"]
    pieces = [i for p in ("a ", "cat", " in a hat") for i in qwen(p, add_special_tokens=False).input_ids]
    assert states.shape[1] == len(pieces) and anima.T5_WEIGHTS not in plain
    ids, weights = extra[anima.T5_IDS], extra[anima.T5_WEIGHTS]
    assert ids.tolist() == plain[anima.T5_IDS].tolist() == [t5_tokenizer()("a cat in a hat").input_ids]
    cat = t5_tokenizer()("cat", add_special_tokens=False).input_ids
    assert [w for i, w in zip(ids[0].tolist(), weights[0].tolist()) if w != 1.0] == [1.5] * len(cat)
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-anima.safetensors")
    with model._use_unet() as net, torch.no_grad():
        wrapped = anima.FAMILY.wrap_network(net)
        weighted = wrapped.context(states, {"t5_ids": [ids], "t5_weights": [weights]})
        unweighted = wrapped.context(states, {"t5_ids": [ids]})
    assert torch.allclose(weighted[0, :ids.shape[1]], unweighted[0, :ids.shape[1]] * weights[0, :, None])
    assert weighted.shape == (1, 512, tiny_cosmos.TEXT) and weighted[0, ids.shape[1]:].abs().max() == 0


# -- ComfyUI's templates ---------------------------------------------------------------------------------


def _template_image(registry, env, name: str, seed_offset: int = 0, prompt: str | None = None) -> np.ndarray:
    wf = parse_document(template(name), registry)
    latent = next(i for i, n in wf.nodes.items() if n.type == "EmptyLatentImage")
    sampler = next(i for i, n in wf.nodes.items() if n.type == "KSampler")
    changes = {f"{latent}.width": SIZE, f"{latent}.height": SIZE, f"{sampler}.steps": 4,
               f"{sampler}.seed": 7 + seed_offset}
    if prompt is not None:
        positive = wf.nodes[sampler].inputs["positive"].node_id
        changes[f"{positive}.text"] = prompt
    outcome = Executor(registry, env).run(wf.with_overrides(changes))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    decode = next(i for i, n in wf.nodes.items() if n.type == "VAEDecode")
    return outcome.results[decode][0].numpy()


@pytest.mark.parametrize("name", ["image_anima_preview.json", "image_anima_base_v1.json"])
def test_the_templates_run_on_tiny_files(registry, env, name):
    image = _template_image(registry, env, name)
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    assert np.abs(image - _template_image(registry, env, name, seed_offset=1)).max() > 0.02  # the seed matters
    assert np.abs(image - _template_image(registry, env, name, prompt="a dog on a boat")).max() > 0.005  # the prompt
