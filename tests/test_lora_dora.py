"""DoRA (``dora_scale``) in LoRA files, as ComfyUI, LyCORIS and peft apply it.

The expected weights are written out here from the definition, independently of Kiln's code:
with ΔW the module's difference times ``alpha / rank`` and ``m`` the ``dora_scale``,
``W' = m * (W + ΔW) / (‖W + ΔW‖ + eps)``, the norm per output row when ``dora_scale`` has the
weight's rows (``[out, 1]``), else per input channel (``[1, in, 1, 1]``), and strength ``s`` gives
``W + s * (W' - W)``. Strength 0 and the base after use are the base byte for byte; the plain
LoRA (``W + s * ΔW``, what Kiln did before) is far from the result.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_flux
import tiny_models as tm
from lora_support import (assert_flux_patch_matches_hand, assert_fp8_patch_matches_hand,
                          assert_paged_patch_matches_hand, assert_strength_zero_is_the_base,
                          assert_unet_matches_hand, flux_env, net_state, patched_states, states, with_lora,
                          write_flux_models)
from node_call import Called, call
from nodes import loaders, lora, split_loaders
from nodes.runtime import offload

G = torch.Generator().manual_seed(47)
EPS = torch.finfo(torch.float32).eps


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * 0.2


def _m(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=G) + 0.5


def decomposed(w: torch.Tensor, dw: torch.Tensor, m: torch.Tensor, strength: float,
               per_row: bool | None = None) -> torch.Tensor:
    """The definition, one row or one input channel at a time (by ``m``'s first axis unless ``per_row``)."""
    merged = w.float() + dw
    out = torch.empty_like(merged)
    if per_row if per_row is not None else m.shape[0] == w.shape[0]:
        for i in range(w.shape[0]):
            out[i] = m.flatten()[i] * merged[i] / (torch.sqrt((merged[i] ** 2).sum()) + EPS)
    else:
        for j in range(w.shape[1]):
            out[:, j] = m.flatten()[j] * merged[:, j] / (torch.sqrt((merged[:, j] ** 2).sum()) + EPS)
    return out if strength == 1.0 else w.float() + strength * (out - w.float())


# -- SD1: a linear and a convolution of the UNet, a LoHa, a CLIP layer --------------------------

_FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # [32, 128]
_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"  # [32, 32]
_CONV = "down_blocks.0.resnets.0.conv1"  # [32, 32, 3, 3]
_FC1 = "encoder.layers.0.mlp.fc1"  # CLIP [128, 64]
_F = {"ff": (_r(4, 128), _r(32, 4), _m(32, 1)),  # down, up, dora_scale per output row; alpha 2
      "conv": (_r(2, 32, 3, 3), _r(32, 2, 1, 1), _m(1, 32, 1, 1)),  # LoCon, per input channel
      "k": ([_r(32, 2), _r(2, 32), _r(32, 2), _r(2, 32)], _m(1, 32)),  # LoHa, square, per input channel
      "fc1": (_r(2, 64), _r(128, 2), _m(1, 64))}


def _kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _sd1_file() -> dict[str, torch.Tensor]:
    (d, u, m), (cd, cu, cm), (h, km), (td, tu, tm_) = _F["ff"], _F["conv"], _F["k"], _F["fc1"]
    ff, conv, k = _kohya(_FF), _kohya(_CONV), _kohya(_K)
    te = "lora_te_text_model_" + _FC1.replace(".", "_")
    return {f"{ff}.lora_down.weight": d, f"{ff}.lora_up.weight": u, f"{ff}.alpha": torch.tensor(2.0),
            f"{ff}.dora_scale": m,
            f"{conv}.lora_down.weight": cd, f"{conv}.lora_up.weight": cu, f"{conv}.dora_scale": cm,
            f"{k}.hada_w1_a": h[0], f"{k}.hada_w1_b": h[1], f"{k}.hada_w2_a": h[2], f"{k}.hada_w2_b": h[3],
            f"{k}.alpha": torch.tensor(1.0), f"{k}.dora_scale": km,
            f"{te}.lora_down.weight": td, f"{te}.lora_up.weight": tu, f"{te}.dora_scale": tm_}


def _sd1_patches() -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(target, parameter) -> (ΔW at strength 1, dora_scale)."""
    (d, u, m), (cd, cu, cm), (h, km), (td, tu, tm_) = _F["ff"], _F["conv"], _F["k"], _F["fc1"]
    conv = (cu.flatten(1) @ cd.flatten(1)).reshape(32, 32, 3, 3)
    return {("unet", f"{_FF}.weight"): ((u @ d) * (2 / 4), m),
            ("unet", f"{_CONV}.weight"): (conv, cm),
            ("unet", f"{_K}.weight"): ((h[0] @ h[1]) * (h[2] @ h[3]) * (1 / 2), km),
            ("text_encoder", f"{_FC1}.weight"): (tu @ td, tm_)}


def _hand(base: dict, strength: float, dora: bool = True) -> dict:
    out = {t: dict(sd) for t, sd in base.items()}
    for (target, param), (dw, m) in _sd1_patches().items():
        if target in out:
            w = base[target][param]
            out[target][param] = decomposed(w, dw, m, strength) if dora else w + strength * dw
    return out


@pytest.fixture(scope="module")
def sd1_file(tiny_models_dir) -> str:
    folder = Path(tiny_models_dir) / "loras"
    folder.mkdir(exist_ok=True)
    save_file(_sd1_file(), str(folder / "sd1-dora.safetensors"))
    return "sd1-dora.safetensors"


def test_sd1_dora_equals_the_weights_decomposed_by_hand_and_leaves_the_base(tiny_env, tiny_models_dir, sd1_file):
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    base = states(model, clip)
    for strength in (1.0, 0.5):
        ours, note = patched_states(tiny_env, model, clip, sd1_file, strength)
        assert "not matched" not in note, note
        assert "4 modules patched (1 in text_encoder, 3 in unet)" in note and "4 with DoRA" in note, note
        hand, plain = _hand(base, strength), _hand(base, strength, dora=False)
        changed = {(t, k) for t in ours for k in ours[t] if not torch.equal(ours[t][k], base[t][k])}
        assert changed == set(_sd1_patches()), changed
        for t, k in changed:
            assert torch.allclose(ours[t][k], hand[t][k], atol=1e-6, rtol=0), (t, k, strength)
            assert (ours[t][k] - plain[t][k]).abs().max() > 1e-2, (t, k)  # dora_scale ignored would fail here
    # stacked after a plain LoRA on the same layer: the DoRA decomposes the weight that LoRA left
    pd, pu = _r(3, 128), _r(32, 3)
    save_file({f"{_kohya(_FF)}.lora_down.weight": pd, f"{_kohya(_FF)}.lora_up.weight": pu},
              str(Path(tiny_models_dir) / "loras" / "sd1-plain-ff.safetensors"))
    m = with_lora(tiny_env, model, "sd1-plain-ff.safetensors", 0.5)
    stacked = net_state(with_lora(tiny_env, m, sd1_file, 1.0))
    dw, mag = _sd1_patches()[("unet", f"{_FF}.weight")]
    first = base["unet"][f"{_FF}.weight"] + (pu @ pd) * 0.5
    assert torch.allclose(stacked[f"{_FF}.weight"], decomposed(first, dw, mag, 1.0), atol=1e-6, rtol=0)
    assert_strength_zero_is_the_base(tiny_env, model, clip, sd1_file, base)


def test_sd1_dora_outputs_equal_the_unet_decomposed_by_hand(tiny_env, sd1_file):
    model, _, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    (m,) = call(lora.lora_loader_model_only, tiny_env, model=model, lora_name=sd1_file, strength_model=0.5)
    assert_unet_matches_hand(model, m, lambda base: _hand({"unet": base}, 0.5)["unet"])


def test_sd1_dora_on_a_paged_unet_equals_it_on_the_whole_unet(sd1_file, tiny_models_dir, tmp_path):
    """Paged weights rest as placeholders: the linear (CastLinear) and the convolution decompose the
    weight read from disk for each call, so the result is the held UNet's."""
    from engine.context import Environment, Paths
    from nodes.runtime.models import ModelManager

    g = torch.Generator().manual_seed(4)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g)
    outs = {}
    for name, mode in (("whole", "off"), ("paged", "on")):
        env = Environment(paths=Paths.under(tmp_path / name, models=Path(tiny_models_dir)),
                          models=ModelManager(device="cpu", offload_mode=mode))
        model, _, _ = call(loaders.checkpoint_loader, env, ckpt_name=tm.checkpoint_name("sd1"))
        (m,) = call(lora.lora_loader_model_only, env, model=model, lora_name=sd1_file, strength_model=0.5)
        runs = []
        for handle in (model, m, model):
            with handle.unet() as unet, torch.no_grad():
                assert bool(offload.offloaded(unet) and offload.offloaded(unet).paged) == (name == "paged")
                runs.append(unet(x, torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0])
        outs[name] = runs
    assert (outs["whole"][1] - outs["whole"][0]).abs().max() > 1e-3
    for i in range(3):  # plain, with the DoRA, plain again afterwards
        assert (outs["paged"][i] - outs["whole"][i]).abs().max() <= 1e-5, i


def test_a_dora_scale_of_another_size_is_an_error_and_a_lone_one_is_reported(tiny_env, tiny_models_dir):
    from engine.context import NodeError

    folder = Path(tiny_models_dir) / "loras"
    d, u, _ = _F["ff"]
    ff = _kohya(_FF)
    save_file({f"{ff}.lora_down.weight": d, f"{ff}.lora_up.weight": u, f"{ff}.dora_scale": _m(1, 7)},
              str(folder / "sd1-dora-bad.safetensors"))
    model, _, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    with pytest.raises(NodeError) as err:
        call(lora.lora_loader_model_only, tiny_env, model=model, lora_name="sd1-dora-bad.safetensors",
             strength_model=1.0)
    assert err.value.input_name == "lora_name" and "dora_scale (1, 7) vs (32, 128)" in str(err.value)
    save_file({f"{ff}.lora_down.weight": d, f"{ff}.lora_up.weight": u, f"{_kohya(_K)}.dora_scale": _m(1, 32)},
              str(folder / "sd1-dora-lone.safetensors"))
    rec = Called()
    call(lora.lora_loader_model_only, tiny_env, rec, model=model, lora_name="sd1-dora-lone.safetensors",
         strength_model=1.0)
    assert "1 modules patched" in rec.messages[0] and "to_k.dora_scale (no LoRA" in rec.messages[0], rec.messages


# -- FLUX: a fused qkv split onto q, k, v; beside fp8 and disk-paged linear layers ---------------

_QKV = (_r(4, 64), _r(192, 4) * 0.5, _m(192, 1))  # diffusion_model.double_blocks.0.img_attn.qkv [192, 64]
_L2 = (_r(4, 320), _r(64, 4), _m(1, 320))  # single_blocks.0.linear2 [64, 320], per input channel


def _flux_file(qkv_scale: torch.Tensor = _QKV[2]) -> dict[str, torch.Tensor]:
    q, l2 = "diffusion_model.double_blocks.0.img_attn.qkv", "lora_unet_single_blocks_0_linear2"
    return {f"{q}.lora_A.weight": _QKV[0], f"{q}.lora_B.weight": _QKV[1], f"{q}.dora_scale": qkv_scale,
            f"{l2}.lora_down.weight": _L2[0], f"{l2}.lora_up.weight": _L2[1], f"{l2}.alpha": torch.tensor(2.0),
            f"{l2}.dora_scale": _L2[2]}


def _flux_hand(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    q, l2 = "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight"
    out[q] = decomposed(out[q].float(), _QKV[1] @ _QKV[0], _QKV[2], 1.0)
    out[l2] = decomposed(out[l2].float(), (_L2[1] @ _L2[0]) * (2 / 4), _L2[2], 1.0)
    return out


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flux-dora")
    write_flux_models(root, _flux_hand)
    tiny_flux._save(root / "loras" / "flux-dora.safetensors", _flux_file())
    tiny_flux._save(root / "loras" / "flux-dora-in.safetensors", _flux_file(_m(1, 64)))
    return root


def test_flux_dora_on_a_fused_qkv_equals_the_file_decomposed_by_hand(flux_root, tmp_path):
    note, changed = assert_flux_patch_matches_hand(flux_root, tmp_path, "flux-dora.safetensors")
    assert "4 with DoRA" in note, note
    assert len(changed) == 4, changed  # to_q, to_k, to_v, proj_out


def test_flux_dora_beside_fp8_and_paged_weights_equals_the_file_decomposed_by_hand(flux_root, tmp_path):
    assert_fp8_patch_matches_hand(flux_root, tmp_path, "flux-dora.safetensors")
    assert_paged_patch_matches_hand(flux_root, tmp_path, "flux-dora.safetensors")


def test_flux_dora_per_input_channel_on_a_fused_qkv_is_an_error_naming_file_and_layer(flux_root, tmp_path):
    """Its norms span q, k and v, which Kiln holds as three layers: refused, not applied wrongly."""
    from engine.context import NodeError

    env = flux_env(flux_root, tmp_path)
    (base,) = call(split_loaders.unet_loader, env, unet_name="base.safetensors")
    with pytest.raises(NodeError) as err:
        call(lora.lora_loader_model_only, env, model=base, lora_name="flux-dora-in.safetensors", strength_model=1.0)
    assert err.value.input_name == "lora_name"
    assert "flux-dora-in.safetensors" in str(err.value) and "double_blocks.0.img_attn.qkv" in str(err.value)


def test_sdxl_dora_under_original_unet_names_and_the_second_text_encoder(tiny_env, tiny_models_dir):
    (Path(tiny_models_dir) / "loras").mkdir(exist_ok=True)
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sdxl"))
    with model.unet() as unet:
        label = unet.state_dict()["add_embedding.linear_1.weight"].clone()
    with clip.encoder("text_encoder_2") as te:
        te_state = {k: v.clone() for k, v in te.state_dict().items()}
    fc1 = next(k for k in te_state if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    (o, i), (p, j) = label.shape, te_state[fc1].shape
    ld, lu, lm = _r(2, i), _r(o, 2), _m(o, 1)  # per output row
    td, tu, tm_ = _r(2, j), _r(p, 2), _m(1, j)  # per input channel
    unet_key, te_key = "lora_unet_label_emb_0_0", "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{unet_key}.lora_down.weight": ld, f"{unet_key}.lora_up.weight": lu, f"{unet_key}.dora_scale": lm,
               f"{te_key}.lora_down.weight": td, f"{te_key}.lora_up.weight": tu, f"{te_key}.alpha": torch.tensor(4.0),
               f"{te_key}.dora_scale": tm_}, str(Path(tiny_models_dir) / "loras" / "sdxl-dora.safetensors"))
    rec = Called()
    m, c = call(lora.lora_loader, tiny_env, rec, model=model, clip=clip, lora_name="sdxl-dora.safetensors",
                strength_model=0.5, strength_clip=1.0)
    assert "2 modules patched" in rec.messages[0] and "2 with DoRA" in rec.messages[0], rec.messages
    assert "not matched" not in rec.messages[0], rec.messages
    with m.unet() as unet:
        assert torch.allclose(unet.state_dict()["add_embedding.linear_1.weight"],
                              decomposed(label, lu @ ld, lm, 0.5), atol=1e-6, rtol=0)
    with c.encoder("text_encoder_2") as te:
        ours = te.state_dict()
        assert torch.allclose(ours[fc1], decomposed(te_state[fc1], (tu @ td) * (4 / 2), tm_, 1.0), atol=1e-6, rtol=0)
        assert sum(not torch.equal(v, te_state[k]) for k, v in ours.items()) == 1
    with model.unet() as unet:
        assert torch.equal(unet.state_dict()["add_embedding.linear_1.weight"], label)


def test_peft_magnitude_vectors_are_per_output_row_whatever_their_shape(tiny_env, tiny_models_dir):
    """peft's ``lora_magnitude_vector``: ``[out]`` for a linear, ``[1, out, 1, 1]`` for a conv; on a square
    conv the dora_scale rule would read the latter per input channel, so the key decides."""
    (Path(tiny_models_dir) / "loras").mkdir(exist_ok=True)
    v, conv = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "down_blocks.0.resnets.0.conv2"
    va, vb, vm = _r(2, 32), _r(32, 2), _m(32)
    ca, cb, cm = _r(2, 32, 3, 3), _r(32, 2, 1, 1), _m(1, 32, 1, 1)
    save_file({f"unet.{v}.lora_A.weight": va, f"unet.{v}.lora_B.weight": vb, f"unet.{v}.lora_magnitude_vector": vm,
               f"unet.{conv}.lora_A.weight": ca, f"unet.{conv}.lora_B.weight": cb,
               f"unet.{conv}.lora_magnitude_vector.weight": cm},
              str(Path(tiny_models_dir) / "loras" / "sd1-peft-dora.safetensors"))
    model, _, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    base = net_state(model)
    rec = Called()
    (m,) = call(lora.lora_loader_model_only, tiny_env, rec, model=model, lora_name="sd1-peft-dora.safetensors",
                strength_model=1.0)
    assert "2 modules patched" in rec.messages[0] and "2 with DoRA" in rec.messages[0], rec.messages
    ours = net_state(m)
    dconv = (cb.flatten(1) @ ca.flatten(1)).reshape(32, 32, 3, 3)
    assert torch.allclose(ours[f"{v}.weight"], decomposed(base[f"{v}.weight"], vb @ va, vm, 1.0, per_row=True),
                          atol=1e-6, rtol=0)
    assert torch.allclose(ours[f"{conv}.weight"], decomposed(base[f"{conv}.weight"], dconv, cm, 1.0, per_row=True),
                          atol=1e-6, rtol=0)
    wrong = decomposed(base[f"{conv}.weight"], dconv, cm, 1.0, per_row=False)
    assert (ours[f"{conv}.weight"] - wrong).abs().max() > 1e-2
