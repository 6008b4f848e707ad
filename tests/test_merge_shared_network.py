"""Merges of two handles of one loaded network: a LoRA'd model (or CLIP) with the same model.

ComfyUI's merges read the second model's weights as loaded plus that model's own patches
(ModelPatcher.get_key_patches takes the backed-up, unpatched weight), so
``ModelMergeSubtract(model + LoRA, model)`` is the LoRA's delta (up @ down * strength), not zero,
though both handles share one network in memory and the first's LoRA is already written into
it when the merge reads the second's weights. The claims, for the UNet and the text encoder:
the difference is the delta (and zero everywhere else), the difference added back to the model
gives the LoRA'd model, two LoRAs on the two sides give the difference of their deltas, and
LoraSave writes the delta; the shared network is bit-identical afterwards.
"""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

import tiny_models as tm
from node_call import Called, call
from nodes import loaders
from nodes import model_merging as mm
from nodes import text
from nodes.runtime.patches import LoraEntry, LowRank

UNET_WEIGHT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
TE_WEIGHT = "encoder.layers.0.self_attn.q_proj.weight"  # the end of its name (the loader may nest it)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from node_call import environment_over

    root = tmp_path_factory.mktemp("shared-merge-models")
    tm.save_single_file("sd1", root / "checkpoints" / tm.checkpoint_name("sd1"))
    yield from environment_over(root, tmp_path_factory.mktemp("shared-merge-data"))


@pytest.fixture(scope="module")
def loaded(env):
    return call(loaders.checkpoint_loader, env, ckpt_name=tm.checkpoint_name("sd1"))


def _with_lora(handle, target: str, name: str, weight: torch.Tensor, strength: float, seed: int):
    """``handle`` with a one-weight LoRA (built in memory) at ``strength``; its delta up @ down * strength."""
    gen = torch.Generator().manual_seed(seed)
    factors = LowRank(torch.randn(weight.shape[0], 2, generator=gen), torch.randn(2, weight.shape[1], generator=gen),
                      1.0)
    entry = LoraEntry(f"lora-{seed}", strength, {target: {name: factors}})
    return dataclasses.replace(handle, loras=(*handle.loras, entry)), factors.up @ factors.down * strength


def _unet(model) -> dict[str, torch.Tensor]:
    with model.unet() as net:
        return {k: v.detach().clone() for k, v in net.named_parameters()}


def _te(clip) -> dict[str, torch.Tensor]:
    with clip.encoder("text_encoder") as te:
        return {k: v.detach().clone() for k, v in te.named_parameters()}


def _te_name(clip) -> str:
    return next(k for k in _te(clip) if k.endswith(TE_WEIGHT))


def _only(got: dict, name: str, want: torch.Tensor, atol: float = 1e-5) -> None:
    """``got[name]`` is ``want`` and every other weight is exactly zero."""
    assert torch.allclose(got[name], want, atol=atol), float((got[name] - want).abs().max())
    assert all(not bool(v.any()) for k, v in got.items() if k != name)


def test_a_loraed_model_minus_the_same_model_is_the_lora_delta(env, loaded):
    model, _, _ = loaded
    base = _unet(model)
    lora_a, delta_a = _with_lora(model, "unet", UNET_WEIGHT, base[UNET_WEIGHT], 0.7, seed=4)
    lora_b, delta_b = _with_lora(model, "unet", UNET_WEIGHT, base[UNET_WEIGHT], -0.4, seed=5)
    assert delta_a.abs().max() > 0.1  # not vacuous: the delta the merges must find
    (difference,) = call(mm.model_merge_subtract, env, model1=lora_a, model2=model, multiplier=1.0)
    _only(_unet(difference), UNET_WEIGHT, delta_a)
    # The difference added back to the model is the LoRA'd model (ComfyUI's add-difference merge).
    back = _unet(call(mm.model_merge_add, env, model1=model, model2=difference)[0])
    want = _unet(lora_a)
    assert all(torch.allclose(back[k], want[k], atol=1e-5) for k in want)
    # ... and to the LoRA'd model itself, the second side (a merge) reading the network as loaded: W + 2 A.
    twice = _unet(call(mm.model_merge_add, env, model1=lora_a, model2=difference)[0])
    assert torch.allclose(twice[UNET_WEIGHT], base[UNET_WEIGHT] + 2.0 * delta_a, atol=1e-5)
    assert torch.equal(twice["conv_in.weight"], base["conv_in.weight"])
    # Each side keeps its own LoRA: (model + A) - (model + B) = A - B.
    both = _unet(call(mm.model_merge_subtract, env, model1=lora_a, model2=lora_b, multiplier=2.0)[0])
    _only(both, UNET_WEIGHT, 2.0 * (delta_a - delta_b))
    # The simple and per-block merges read the second side the same way: r (W + A) + (1 - r) W = W + r A.
    simple = _unet(call(mm.model_merge_simple, env, model1=lora_a, model2=model, ratio=0.25)[0])
    assert torch.allclose(simple[UNET_WEIGHT], base[UNET_WEIGHT] + 0.25 * delta_a, atol=1e-5)
    blocks = _unet(call(mm.model_merge_blocks, env, model1=lora_a, model2=model, input=0.6, middle=1.0, out=1.0)[0])
    assert torch.allclose(blocks[UNET_WEIGHT], base[UNET_WEIGHT] + 0.6 * delta_a, atol=1e-5)
    after = _unet(model)
    assert all(torch.equal(after[k], base[k]) for k in base)  # the shared network restored bit for bit


def test_a_loraed_clip_minus_the_same_clip_is_the_lora_delta(env, loaded):
    _, clip, _ = loaded
    base, name = _te(clip), _te_name(clip)
    lora_a, delta_a = _with_lora(clip, "text_encoder", name, base[name], 0.7, seed=6)
    assert delta_a.abs().max() > 0.1
    (difference,) = call(mm.clip_merge_subtract, env, clip1=lora_a, clip2=clip, multiplier=1.0)
    _only(_te(difference), name, delta_a)
    (back,) = call(mm.clip_merge_add, env, clip1=clip, clip2=difference)
    got, want = _te(back), _te(lora_a)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    encoded = call(text.clip_text_encode, env, text="a red barn", clip=back)[0][0][0]
    assert torch.allclose(encoded, call(text.clip_text_encode, env, text="a red barn", clip=lora_a)[0][0][0],
                          atol=1e-4)
    after = _te(clip)
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_lora_save_of_a_loraed_model_minus_itself_writes_the_delta(env, loaded):
    from safetensors import safe_open

    from nodes import lora_extract

    model, clip, _ = loaded
    lora_m, delta_m = _with_lora(model, "unet", UNET_WEIGHT, _unet(model)[UNET_WEIGHT], 0.7, seed=4)
    te_name = _te_name(clip)
    lora_c, delta_c = _with_lora(clip, "text_encoder", te_name, _te(clip)[te_name], 0.7, seed=6)
    (model_diff,) = call(mm.model_merge_subtract, env, model1=lora_m, model2=model, multiplier=1.0)
    (clip_diff,) = call(mm.clip_merge_subtract, env, clip1=lora_c, clip2=clip, multiplier=1.0)
    rec = Called()
    call(lora_extract.lora_save, env, rec, filename_prefix="loras/shared", rank=4, lora_type="full_diff",
         bias_diff=False, model_diff=model_diff, text_encoder_diff=clip_diff)
    saved = rec.ui["loras"][0]
    path = env.paths.models.root / "loras" / saved["filename"]
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(env.paths.output.root / saved["subfolder"] / saved["filename"]), str(path))
    unet_key = "diffusion_model." + model.family.original_names(model.peek())[UNET_WEIGHT].rpartition(".")[0] + ".diff"
    te_key = "text_encoders.clip_l.transformer." + te_name.rpartition(".")[0] + ".diff"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    assert torch.allclose(tensors[unet_key], delta_m, atol=1e-2, rtol=1e-3)  # stored in half precision
    assert torch.allclose(tensors[te_key], delta_c, atol=1e-2, rtol=1e-3)
    assert all(not bool(v.any()) for k, v in tensors.items() if k not in (unet_key, te_key))
