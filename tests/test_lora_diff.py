"""Whole weight and bias differences in LoRA files (``.diff``, ``.diff_b``, ``.w_norm``/``.b_norm``,
a LoRA's own ``lora_B.bias``), as ComfyUI reads them: ``parameter += strength * diff``.

Each file here is written beside a "by hand" model: the same differences added to the
base weights directly (for FLUX in the original BFL file, whose fused ``qkv`` and swapped
final modulation Kiln's loader then splits). The LoRA through LoraLoader must give that
model: the same weights on SD1's UNet and CLIP and on FLUX, the same latents where the
differences run beside fp8 or disk-paged weights; strength 0 is the base byte for byte,
and the base is restored exactly when the LoRA is no longer in use.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_flux
import tiny_models as tm
from engine.context import NodeError
from lora_support import (assert_fp8_patch_matches_hand, assert_paged_patch_matches_hand,
                          assert_strength_zero_is_the_base, assert_unet_matches_hand, flux_env, flux_sample,
                          net_state, patched_states, states, with_lora, write_flux_models)
from node_call import Called, call
from nodes import loaders, lora, split_loaders

G = torch.Generator().manual_seed(41)


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * 0.05


# -- SD1: UNet and CLIP, every key kind and naming ------------------------------------------------

#: (file key, parameter it adds to, "unet" | "text_encoder", multiplier of the file tensor)
_R = {"conv": _r(32, 32, 3, 3), "conv_b": _r(32), "gn": _r(32), "gn_b": _r(32), "emb_b": _r(32),
      "fc1": _r(128, 64), "fc1_b": _r(128), "ln": _r(64), "up": _r(32, 2), "down": _r(2, 128), "up_b": _r(32),
      "A": _r(4, 32), "B": _r(32, 4), "B_b": _r(32)}
_SD1_DIFFS = [
    ("lora_unet_down_blocks_0_resnets_0_conv1.diff", "down_blocks.0.resnets.0.conv1.weight", "unet", "conv"),
    ("lora_unet_down_blocks_0_resnets_0_conv1.diff_b", "down_blocks.0.resnets.0.conv1.bias", "unet", "conv_b"),
    ("lora_unet_down_blocks_0_resnets_0_norm1.w_norm", "down_blocks.0.resnets.0.norm1.weight", "unet", "gn"),
    ("lora_unet_down_blocks_0_resnets_0_norm1.b_norm", "down_blocks.0.resnets.0.norm1.bias", "unet", "gn_b"),
    ("lora_unet_input_blocks_1_0_emb_layers_1.diff_b", "down_blocks.0.resnets.0.time_emb_proj.bias", "unet", "emb_b"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.diff", "encoder.layers.0.mlp.fc1.weight",
     "text_encoder", "fc1"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.diff_b", "encoder.layers.0.mlp.fc1.bias",
     "text_encoder", "fc1_b"),
    ("text_encoder.text_model.final_layer_norm.diff", "final_layer_norm.weight", "text_encoder", "ln"),
]
_FF = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
_OUT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
_FF_PARAM = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
_OUT_PARAM = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"


def _sd1_file() -> dict[str, torch.Tensor]:
    state = {key: _R[r] for key, _, _, r in _SD1_DIFFS}
    # a kohya pair with alpha 1 (scale 1/2) and its bias; a PEFT pair (no alpha) with lora_B.bias
    state.update({f"{_FF}.lora_down.weight": _R["down"], f"{_FF}.lora_up.weight": _R["up"],
                  f"{_FF}.alpha": torch.tensor(1.0), f"{_FF}.lora_up.bias": _R["up_b"],
                  f"{_OUT}.lora_A.weight": _R["A"], f"{_OUT}.lora_B.weight": _R["B"], f"{_OUT}.lora_B.bias": _R["B_b"]})
    return state


def _by_hand(base: dict[str, dict[str, torch.Tensor]], strength: float) -> dict[str, dict[str, torch.Tensor]]:
    """The base weights with the file's differences added directly (written out here, not Kiln's table)."""
    out = {t: {k: v.clone() for k, v in sd.items()} for t, sd in base.items()}
    for _, param, target, r in _SD1_DIFFS:
        if target in out:
            out[target][param] = out[target][param] + _R[r] * strength
    u = out["unet"]
    u[f"{_FF_PARAM}.weight"] = u[f"{_FF_PARAM}.weight"] + (_R["up"] @ _R["down"]) * 0.5 * strength
    u[f"{_FF_PARAM}.bias"] = u[f"{_FF_PARAM}.bias"] + _R["up_b"] * 0.5 * strength
    u[f"{_OUT_PARAM}.weight"] = u[f"{_OUT_PARAM}.weight"] + (_R["B"] @ _R["A"]) * strength
    u[f"{_OUT_PARAM}.bias"] = u[f"{_OUT_PARAM}.bias"] + _R["B_b"] * strength
    return out


@pytest.fixture(scope="module")
def sd1_files(tiny_models_dir) -> Path:
    folder = Path(tiny_models_dir) / "loras"
    folder.mkdir(exist_ok=True)
    save_file(_sd1_file(), str(folder / "sd1-diff.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.diff_b": _r(32),
               "lora_unet_down_blocks_0_resnets_0_conv2.diff": _r(32, 32, 3, 3)},
              str(folder / "sd1-diff-no-bias.safetensors"))
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.diff": _r(32, 16, 3, 3)},
              str(folder / "sd1-diff-bad.safetensors"))
    return folder


def test_sd1_diffs_equal_the_weights_changed_by_hand_and_leave_the_base(tiny_env, sd1_files):
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    base = states(model, clip)
    for strength in (1.0, -0.7):
        ours, note = patched_states(tiny_env, model, clip, "sd1-diff.safetensors", strength)
        assert "not matched" not in note, note
        assert "12 modules patched (3 in text_encoder, 9 in unet)" in note, note
        assert "10 of them by whole weight or bias differences" in note, note
        hand = _by_hand(base, strength)
        for target in ours:
            changed = [k for k in ours[target] if not torch.equal(ours[target][k], base[target][k])]
            assert len(changed) == {"unet": 9, "text_encoder": 3}[target], changed
            for k, v in ours[target].items():
                assert torch.allclose(v, hand[target][k], atol=1e-6, rtol=0), (target, k)
        for _, param, target, _ in _SD1_DIFFS:  # whole differences: the same single rounding as by hand
            assert torch.equal(ours[target][param], hand[target][param]), param
    assert_strength_zero_is_the_base(tiny_env, model, clip, "sd1-diff.safetensors", base)


def test_sd1_diff_outputs_equal_the_unet_changed_by_hand(tiny_env, sd1_files):
    """Not only the weights: the patched UNet's prediction equals a UNet holding the hand-made weights."""
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    (m,) = call(lora.lora_loader_model_only, tiny_env, model=model, lora_name="sd1-diff.safetensors",
                strength_model=1.0)
    assert_unet_matches_hand(model, m, lambda base: _by_hand({"unet": base}, 1.0)["unet"])


def test_a_bias_difference_for_a_layer_without_bias_is_reported_and_a_wrong_shape_is_an_error(tiny_env, sd1_files):
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    rec = Called()
    call(lora.lora_loader_model_only, tiny_env, rec, model=model, lora_name="sd1-diff-no-bias.safetensors",
         strength_model=1.0)
    assert "1 modules patched" in rec.messages[0] and "1 not matched" in rec.messages[0], rec.messages
    assert "attn1_to_q.diff_b (the layer has no bias)" in rec.messages[0], rec.messages
    with pytest.raises(NodeError) as err:
        call(lora.lora_loader_model_only, tiny_env, model=model, lora_name="sd1-diff-bad.safetensors",
             strength_model=1.0)
    assert err.value.input_name == "lora_name" and "conv1.diff (32, 16, 3, 3) vs (32, 32, 3, 3)" in str(err.value)


def test_sdxl_diffs_under_original_unet_names_and_both_text_encoders(tiny_env, tiny_models_dir):
    """kohya's SDXL naming: the UNet in the original layout (``label_emb``, ``input_blocks``), the
    encoders as ``lora_te1_`` / ``lora_te2_``; each difference lands on its weight exactly."""
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sdxl"))
    #: file key -> (target, diffusers parameter without the text encoders' optional "text_model.")
    keys = {"lora_unet_label_emb_0_0.diff": ("unet", "add_embedding.linear_1.weight"),
            "lora_unet_label_emb_0_0.diff_b": ("unet", "add_embedding.linear_1.bias"),
            "lora_unet_input_blocks_1_0_out_layers_0.w_norm": ("unet", "down_blocks.0.resnets.0.norm2.weight"),
            "lora_unet_input_blocks_1_0_out_layers_0.b_norm": ("unet", "down_blocks.0.resnets.0.norm2.bias"),
            "lora_te1_text_model_final_layer_norm.diff": ("text_encoder", "final_layer_norm.weight"),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.diff_b": ("text_encoder_2", "encoder.layers.0.mlp.fc1.bias")}
    base = states(model, clip, ("text_encoder", "text_encoder_2"))
    params = {key: (t, p if p in base[t] else "text_model." + p) for key, (t, p) in keys.items()}
    state = {key: _r(*base[t][p].shape) for key, (t, p) in params.items()}
    save_file(state, str(Path(tiny_models_dir) / "loras" / "sdxl-diff.safetensors"))
    rec = Called()
    m, c = call(lora.lora_loader, tiny_env, rec, model=model, clip=clip, lora_name="sdxl-diff.safetensors",
                strength_model=0.8, strength_clip=0.8)
    assert "6 modules patched" in rec.messages[0] and "not matched" not in rec.messages[0], rec.messages
    ours = states(m, c, ("text_encoder", "text_encoder_2"))
    hand = {t: dict(sd) for t, sd in base.items()}
    for key, (t, p) in params.items():
        hand[t][p] = base[t][p] + state[key] * 0.8
    assert all(torch.equal(ours[t][k], hand[t][k]) for t in hand for k in hand[t])
    assert sum(not torch.equal(ours[t][k], base[t][k]) for t in base for k in base[t]) == 6


# -- FLUX: original-layout names (fused qkv, swapped final modulation), fp8 and paged weights ----

_FLUX = {"qkv": _r(192, 64), "qkv_b": _r(192), "l2_b": _r(64), "mod_b": _r(128), "A": _r(4, 64), "B": _r(64, 4),
         "B_b": _r(64), "qn": _r(32)}
#: file key -> (BFL parameter the hand-made model adds it to, tensor)
_FLUX_DIFFS = {"diffusion_model.double_blocks.0.img_attn.qkv.diff": ("double_blocks.0.img_attn.qkv.weight", "qkv"),
               "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": ("double_blocks.0.img_attn.qkv.bias", "qkv_b"),
               "lora_unet_single_blocks_0_linear2.diff_b": ("single_blocks.0.linear2.bias", "l2_b"),
               "diffusion_model.final_layer.adaLN_modulation.1.diff_b": ("final_layer.adaLN_modulation.1.bias",
                                                                         "mod_b")}
_NORM_KEY = "transformer.single_transformer_blocks.0.attn.norm_q.diff"  # a 1-D weight, in diffusers' names


def _flux_hand(state: dict[str, torch.Tensor], norm: bool = False) -> dict[str, torch.Tensor]:
    out = dict(state)
    for param, r in _FLUX_DIFFS.values():
        out[param] = out[param].float() + _FLUX[r]
    out["img_in.weight"] = out["img_in.weight"].float() + _FLUX["B"] @ _FLUX["A"]
    out["img_in.bias"] = out["img_in.bias"] + _FLUX["B_b"]
    if norm:
        out["single_blocks.0.norm.query_norm.scale"] = out["single_blocks.0.norm.query_norm.scale"] + _FLUX["qn"]
    return out


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flux-diff")
    bfl = write_flux_models(root, _flux_hand)
    tiny_flux._save(root / "diffusion_models" / "hand-norm.safetensors", _flux_hand(bfl, norm=True))
    state = {key: _FLUX[r] for key, (_, r) in _FLUX_DIFFS.items()}
    state.update({"diffusion_model.img_in.lora_A.weight": _FLUX["A"],
                  "diffusion_model.img_in.lora_B.weight": _FLUX["B"],
                  "diffusion_model.img_in.lora_B.bias": _FLUX["B_b"]})  # BFL's control-LoRA shape of key
    tiny_flux._save(root / "loras" / "flux-diff.safetensors", state)
    tiny_flux._save(root / "loras" / "flux-diff-norm.safetensors", dict(state, **{_NORM_KEY: _FLUX["qn"]}))
    return root


def test_flux_diffs_in_the_original_layout_equal_the_file_changed_by_hand(flux_root, tmp_path):
    env = flux_env(flux_root, tmp_path)
    (base,) = call(split_loaders.unet_loader, env, unet_name="base.safetensors")
    (hand,) = call(split_loaders.unet_loader, env, unet_name="hand-norm.safetensors")
    before, expected = net_state(base), net_state(hand)
    rec = Called()
    ours = net_state(with_lora(env, base, "flux-diff-norm.safetensors", rec=rec))
    assert "not matched" not in rec.messages[0] and "by whole weight or bias differences" in rec.messages[0]
    # qkv weight and bias split onto to_q/k/v (6), linear2's bias, the final modulation's bias, img_in's
    # weight and bias, the norm: 11 parameters
    assert "11 modules patched" in rec.messages[0], rec.messages
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert len(changed) == 11, changed
    assert all(torch.allclose(ours[k], expected[k], atol=1e-6, rtol=0) for k in ours)
    assert all(torch.equal(ours[k], expected[k]) for k in changed if "x_embedder" not in k)  # whole diffs: exact
    assert all(torch.equal(v, before[k]) for k, v in net_state(with_lora(env, base, "flux-diff.safetensors", 0.0)).items())
    assert all(torch.equal(v, before[k]) for k, v in net_state(base).items())


@pytest.mark.parametrize("key,param", [
    # ComfyUI names a parameter not called "weight" in full: BFL's q/k norms hold "scale"
    ("diffusion_model.single_blocks.0.norm.query_norm.scale.diff", "single_transformer_blocks.0.attn.norm_q.weight"),
    # LyCORIS / kohya name the module
    ("lora_unet_double_blocks_0_txt_attn_norm_key_norm.diff", "transformer_blocks.0.attn.norm_added_k.weight"),
])
def test_a_flux_norm_difference_under_its_original_name_equals_it_under_the_diffusers_name(flux_root, tmp_path,
                                                                                            key, param):
    stem = param.replace(".", "-")
    tiny_flux._save(flux_root / "loras" / f"bfl-{stem}.safetensors", {key: _FLUX["qn"]})
    diffusers_key = "transformer." + param[: -len(".weight")] + ".diff"
    tiny_flux._save(flux_root / "loras" / f"diffusers-{stem}.safetensors", {diffusers_key: _FLUX["qn"]})
    env = flux_env(flux_root, tmp_path)
    (base,) = call(split_loaders.unet_loader, env, unet_name="base.safetensors")
    before = net_state(base)
    rec = Called()
    ours = net_state(with_lora(env, base, f"bfl-{stem}.safetensors", rec=rec))
    assert "not matched" not in rec.messages[0] and "1 modules patched" in rec.messages[0], rec.messages
    assert [k for k in ours if not torch.equal(ours[k], before[k])] == [param]
    assert torch.equal(ours[param], before[param] + _FLUX["qn"])
    theirs = net_state(with_lora(env, base, f"diffusers-{stem}.safetensors"))
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert all(torch.equal(v, before[k]) for k, v in net_state(base).items())


def test_flux_diffs_beside_fp8_weights_equal_the_upcast_file_changed_by_hand(flux_root, tmp_path):
    assert_fp8_patch_matches_hand(flux_root, tmp_path, "flux-diff.safetensors")

def test_flux_diffs_beside_paged_weights_equal_the_file_changed_by_hand(flux_root, tmp_path):
    env, model, ours = assert_paged_patch_matches_hand(flux_root, tmp_path, "flux-diff.safetensors")
    # a q-norm difference (diffusers' RMSNorm): added to the weight brought in while it runs
    whole = flux_env(flux_root, tmp_path / "whole")
    base = call(split_loaders.unet_loader, whole, unet_name="base.safetensors")[0]
    with_norm = flux_sample(whole, with_lora(whole, base, "flux-diff-norm.safetensors"))
    assert (with_norm - ours).abs().max() > 1e-4  # the norm difference counts
    assert (flux_sample(env, with_lora(env, model, "flux-diff-norm.safetensors")) - with_norm).abs().max() <= 1e-5
    with model.unet() as net:
        assert not any(vars(m).get("kiln_deltas") for m in net.modules())
