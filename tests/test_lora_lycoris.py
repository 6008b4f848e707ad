"""LyCORIS LoHa and LoKr modules in LoRA files, as ComfyUI applies them.

The differences are written out here from the published definitions, independently of Kiln's
code: LoHa ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank`` (rank = ``w1_b``'s rows; with
Tucker cores each factor is ``w_a.T @ t[:, :, k, l] @ w_b`` per kernel tap); LoKr
``ΔW = kron(w1, w2) · alpha / rank`` (rank of the factored ``w2``, else of the factored ``w1``,
else scale 1), the Kronecker product built here as a broadcast outer product. Each file must
give what the hand-changed weights give; strength 0 and the base after use are byte for byte
the base; the node message names the modules as LoHa/LoKr, none as unmatched.
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
                          assert_unet_matches_hand, net_state, patched_states, states, with_lora,
                          write_flux_models)
from node_call import Called, call
from nodes import loaders, lora
from nodes.runtime import offload

G = torch.Generator().manual_seed(43)


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * 0.2


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kron(a, b)[i*m + k, j*n + l, ...] = a[i, j] * b[k, l, ...] (a 2-D, b 2-D or a 4-D kernel)."""
    extra = b.shape[2:]
    out = a[:, None, :, None].reshape(a.shape[0], 1, a.shape[1], 1, *([1] * len(extra))) * b[None, :, None]
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *extra)


def tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw]: at each kernel tap, ``a.T @ t[:, :, kh, kw] @ b`` (a: [rank, out], b: [rank, in])."""
    out = torch.empty(a.shape[1], b.shape[1], *t.shape[2:])
    for i in range(t.shape[2]):
        for j in range(t.shape[3]):
            out[:, :, i, j] = a.T @ t[:, :, i, j] @ b
    return out


def _loha(p: str, w1a, w1b, w2a, w2b, alpha=None, t1=None, t2=None) -> dict[str, torch.Tensor]:
    keys = {f"{p}.hada_w1_a": w1a, f"{p}.hada_w1_b": w1b, f"{p}.hada_w2_a": w2a, f"{p}.hada_w2_b": w2b}
    if alpha is not None:
        keys[f"{p}.alpha"] = torch.tensor(float(alpha))
    if t1 is not None:
        keys.update({f"{p}.hada_t1": t1, f"{p}.hada_t2": t2})
    return keys


# -- SD1: linear and convolution layers of the UNet, a CLIP layer ---------------------------------

_FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # [32, 128]
_ATT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # to_out.0, to_k, to_v: [32, 32]
_RES = "down_blocks.0.resnets.0"  # conv1, conv2: [32, 32, 3, 3]
_F = {"ff": [_r(32, 2), _r(2, 128), _r(32, 2), _r(2, 128)], "out_w1": _r(4, 4), "out_w2": [_r(8, 2), _r(2, 8)],
      "k_w1": [_r(2, 1), _r(1, 4)], "q_w1": [_r(4, 1), _r(1, 4)], "q_w2": [_r(8, 3), _r(3, 8)], "k_w2": _r(16, 8), "v_w1": _r(2, 2), "v_w2": _r(16, 16),
      "c1": [_r(2, 2, 3, 3), _r(2, 32), _r(2, 32), _r(2, 2, 3, 3), _r(2, 32), _r(2, 32)],
      "ci": [_r(4, 2), _r(2, 2, 3, 3), _r(2, 8), _r(2, 2)],  # conv_in [32, 4, 3, 3]: w1, t2, w2_a, w2_b
      "co": [_r(4, 2), _r(2, 288), _r(4, 2), _r(2, 288)],  # LoHa on conv_out [4, 32, 3, 3], no Tucker
      "c2_w1": _r(4, 4), "c2_w2": _r(8, 8, 3, 3), "fc1": [_r(128, 3), _r(3, 64), _r(128, 3), _r(3, 64)]}
_FC1 = "encoder.layers.0.mlp.fc1"  # CLIP [128, 64]


def _sd1_file() -> dict[str, torch.Tensor]:
    f, state = _F, {}
    ff = "lora_unet_" + _FF.replace(".", "_")  # kohya names
    state.update(_loha(ff, *f["ff"], alpha=1))
    state.update({f"unet.{_ATT}.to_out.0.lokr_w1": f["out_w1"], f"unet.{_ATT}.to_out.0.lokr_w2_a": f["out_w2"][0],
                  f"unet.{_ATT}.to_out.0.lokr_w2_b": f["out_w2"][1], f"unet.{_ATT}.to_out.0.alpha": torch.tensor(1.0)})
    k = "lora_unet_" + f"{_ATT}.to_k".replace(".", "_")
    state.update({f"{k}.lokr_w1_a": f["k_w1"][0], f"{k}.lokr_w1_b": f["k_w1"][1], f"{k}.lokr_w2": f["k_w2"],
                  f"{k}.alpha": torch.tensor(4.0)})
    q = "lora_unet_" + f"{_ATT}.to_q".replace(".", "_")  # both factored, alpha 3
    state.update({f"{q}.lokr_w1_a": f["q_w1"][0], f"{q}.lokr_w1_b": f["q_w1"][1], f"{q}.lokr_w2_a": f["q_w2"][0],
                  f"{q}.lokr_w2_b": f["q_w2"][1], f"{q}.alpha": torch.tensor(3.0)})
    v = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_v"  # the original layout's name
    state.update({f"{v}.lokr_w1": f["v_w1"], f"{v}.lokr_w2": f["v_w2"], f"{v}.alpha": torch.tensor(8.0)})
    t1, a1, b1, t2, a2, b2 = f["c1"]
    state.update(_loha("lora_unet_down_blocks_0_resnets_0_conv1", a1, b1, a2, b2, alpha=2, t1=t1, t2=t2))
    state.update({"lora_unet_down_blocks_0_resnets_0_conv2.lokr_w1": f["c2_w1"],
                  "lora_unet_down_blocks_0_resnets_0_conv2.lokr_w2": f["c2_w2"]})
    ci = "lora_unet_input_blocks_0_0"  # conv_in, original name; LoKr with a Tucker core, alpha 1
    state.update({f"{ci}.lokr_w1": f["ci"][0], f"{ci}.lokr_t2": f["ci"][1], f"{ci}.lokr_w2_a": f["ci"][2],
                  f"{ci}.lokr_w2_b": f["ci"][3], f"{ci}.alpha": torch.tensor(1.0)})
    state.update(_loha("lora_unet_conv_out", *f["co"], alpha=4))
    state.update(_loha("lora_te_text_model_encoder_layers_0_mlp_fc1", *f["fc1"]))
    return state


def _sd1_deltas() -> dict[tuple[str, str], torch.Tensor]:
    """(target, parameter) -> ΔW at strength 1, from the definitions."""
    f = _F
    w1a, w1b, w2a, w2b = f["ff"]
    t1, a1, b1, t2, a2, b2 = f["c1"]
    c1, c2, c3, c4 = f["fc1"]
    return {("unet", f"{_FF}.weight"): (w1a @ w1b) * (w2a @ w2b) * (1 / 2),
            ("unet", f"{_ATT}.to_out.0.weight"): kron(f["out_w1"], f["out_w2"][0] @ f["out_w2"][1]) * (1 / 2),
            ("unet", f"{_ATT}.to_k.weight"): kron(f["k_w1"][0] @ f["k_w1"][1], f["k_w2"]) * (4 / 1),
            # both factored: the rank is w2's (3), not w1's (1)
            ("unet", f"{_ATT}.to_q.weight"): kron(f["q_w1"][0] @ f["q_w1"][1], f["q_w2"][0] @ f["q_w2"][1]) * (3 / 3),
            ("unet", f"{_ATT}.to_v.weight"): kron(f["v_w1"], f["v_w2"]),  # both whole: scale 1
            ("unet", f"{_RES}.conv1.weight"): tucker(t1, a1, b1) * tucker(t2, a2, b2) * (2 / 2),
            ("unet", f"{_RES}.conv2.weight"): kron(f["c2_w1"], f["c2_w2"]),
            ("unet", "conv_out.weight"): ((f["co"][0] @ f["co"][1]) * (f["co"][2] @ f["co"][3])).reshape(4, 32, 3, 3)
            * (4 / 2),
            ("unet", "conv_in.weight"): kron(f["ci"][0], tucker(f["ci"][1], f["ci"][2], f["ci"][3])) * (1 / 2),
            ("text_encoder", f"{_FC1}.weight"): (c1 @ c2) * (c3 @ c4)}


@pytest.fixture(scope="module")
def sd1_files(tiny_models_dir) -> Path:
    folder = Path(tiny_models_dir) / "loras"
    folder.mkdir(exist_ok=True)
    save_file(_sd1_file(), str(folder / "sd1-lycoris.safetensors"))
    save_file({f"lora_unet_{_FF.replace('.', '_')}.lora_down.weight": _F["ff"][1],
               f"lora_unet_{_FF.replace('.', '_')}.lora_up.weight": _F["ff"][0]},
              str(folder / "sd1-plain.safetensors"))
    return folder


def _hand(base: dict, strength: float, plain: float = 0.0) -> dict:
    out = {t: dict(sd) for t, sd in base.items()}
    for (target, param), delta in _sd1_deltas().items():
        if target in out:
            out[target][param] = base[target][param] + delta * strength
    if plain:
        out["unet"][f"{_FF}.weight"] = out["unet"][f"{_FF}.weight"] + (_F["ff"][0] @ _F["ff"][1]) * plain
    return out


def test_sd1_loha_and_lokr_equal_the_weights_changed_by_hand_and_leave_the_base(tiny_env, sd1_files):
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    base = states(model, clip)
    for strength in (1.0, -0.6):
        ours, note = patched_states(tiny_env, model, clip, "sd1-lycoris.safetensors", strength)
        assert "not matched" not in note, note
        assert "10 modules patched (1 in text_encoder, 9 in unet)" in note, note
        assert "10 by LyCORIS LoHa (4) and LoKr (6)" in note, note
        hand = _hand(base, strength)
        changed = {(t, k) for t in ours for k in ours[t] if not torch.equal(ours[t][k], base[t][k])}
        assert changed == set(_sd1_deltas()), changed
        for t in ours:
            for k, v in ours[t].items():
                assert torch.allclose(v, hand[t][k], atol=1e-6, rtol=0), (t, k)
    # stacked with an ordinary LoRA on the same layer: the differences add
    m = with_lora(tiny_env, model, "sd1-lycoris.safetensors", -0.6)
    stacked = net_state(with_lora(tiny_env, m, "sd1-plain.safetensors", 0.5))
    hand = _hand(base, -0.6, plain=0.5)["unet"]
    assert all(torch.allclose(v, hand[k], atol=1e-6, rtol=0) for k, v in stacked.items())
    assert_strength_zero_is_the_base(tiny_env, model, clip, "sd1-lycoris.safetensors", base)


def test_sd1_loha_and_lokr_outputs_equal_the_unet_changed_by_hand(tiny_env, sd1_files):
    model, _, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    (m,) = call(lora.lora_loader_model_only, tiny_env, model=model, lora_name="sd1-lycoris.safetensors",
                strength_model=0.8)
    assert_unet_matches_hand(model, m, lambda base: _hand({"unet": base}, 0.8)["unet"])


def test_incomplete_or_misfit_lycoris_modules_are_reported(tiny_env, tiny_models_dir):
    folder = Path(tiny_models_dir) / "loras"
    ff = "lora_unet_" + _FF.replace(".", "_")
    save_file({**_loha(ff, *_F["ff"]), "lora_unet_down_blocks_0_resnets_0_conv2.lokr_w1": _F["c2_w1"]},
              str(folder / "sd1-lycoris-part.safetensors"))
    model, _, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))
    rec = Called()
    call(lora.lora_loader_model_only, tiny_env, rec, model=model, lora_name="sd1-lycoris-part.safetensors",
         strength_model=1.0)
    assert "1 modules patched" in rec.messages[0] and "1 not matched" in rec.messages[0], rec.messages
    assert "conv2 (LoKr without its w2 factor)" in rec.messages[0], rec.messages
    save_file(_loha("lora_unet_down_blocks_0_resnets_0_conv1", *_F["ff"]), str(folder / "sd1-lycoris-bad.safetensors"))
    from engine.context import NodeError

    with pytest.raises(NodeError) as err:
        call(lora.lora_loader_model_only, tiny_env, model=model, lora_name="sd1-lycoris-bad.safetensors",
             strength_model=1.0)
    assert err.value.input_name == "lora_name" and "conv1 (32, 128) vs (32, 32, 3, 3)" in str(err.value)


def test_sdxl_lokr_under_original_unet_names_and_the_second_text_encoder(tiny_env, tiny_models_dir):
    model, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sdxl"))
    with model.unet() as unet:
        label = unet.state_dict()["add_embedding.linear_1.weight"].clone()
    with clip.encoder("text_encoder_2") as te:
        te_state = {k: v.clone() for k, v in te.state_dict().items()}
    fc1 = next(k for k in te_state if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    (o, i), (p, j) = label.shape, te_state[fc1].shape
    w1, w2 = _r(2, 2), _r(o // 2, i // 2)
    h = [_r(p, 2), _r(2, j), _r(p, 2), _r(2, j)]
    state = {"lora_unet_label_emb_0_0.lokr_w1": w1, "lora_unet_label_emb_0_0.lokr_w2": w2,
             **_loha("lora_te2_text_model_encoder_layers_0_mlp_fc1", *h, alpha=4)}
    save_file(state, str(Path(tiny_models_dir) / "loras" / "sdxl-lycoris.safetensors"))
    rec = Called()
    m, c = call(lora.lora_loader, tiny_env, rec, model=model, clip=clip, lora_name="sdxl-lycoris.safetensors",
                strength_model=0.5, strength_clip=1.5)
    assert "2 modules patched" in rec.messages[0] and "not matched" not in rec.messages[0], rec.messages
    with m.unet() as unet:
        assert torch.allclose(unet.state_dict()["add_embedding.linear_1.weight"], label + kron(w1, w2) * 0.5,
                              atol=1e-6, rtol=0)
    with c.encoder("text_encoder_2") as te:
        ours = te.state_dict()
        assert torch.allclose(ours[fc1], te_state[fc1] + (h[0] @ h[1]) * (h[2] @ h[3]) * (4 / 2) * 1.5,
                              atol=1e-6, rtol=0)
        assert sum(not torch.equal(v, te_state[k]) for k, v in ours.items()) == 1


# -- FLUX: original-layout names (a fused qkv), beside fp8 and disk-paged linear layers -----------

_Q = [_r(192, 2), _r(2, 64), _r(192, 2), _r(2, 64)]  # LoHa on double_blocks.0.img_attn.qkv [192, 64]
_L2 = [_r(4, 4), _r(16, 2), _r(2, 80)]  # LoKr on single_blocks.0.linear2 [64, 320]: w1, w2_a, w2_b


def _flux_file() -> dict[str, torch.Tensor]:
    state = _loha("diffusion_model.double_blocks.0.img_attn.qkv", *[v * 0.3 for v in _Q], alpha=1)
    l2 = "lora_unet_single_blocks_0_linear2"
    state.update({f"{l2}.lokr_w1": _L2[0], f"{l2}.lokr_w2_a": _L2[1], f"{l2}.lokr_w2_b": _L2[2],
                  f"{l2}.alpha": torch.tensor(1.0)})
    return state


def _flux_hand(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    a, b, c, d = [v * 0.3 for v in _Q]
    out["double_blocks.0.img_attn.qkv.weight"] = out["double_blocks.0.img_attn.qkv.weight"].float() + \
        (a @ b) * (c @ d) * (1 / 2)
    out["single_blocks.0.linear2.weight"] = out["single_blocks.0.linear2.weight"].float() + \
        kron(_L2[0], _L2[1] @ _L2[2]) * (1 / 2)
    return out


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flux-lycoris")
    write_flux_models(root, _flux_hand)
    tiny_flux._save(root / "loras" / "flux-lycoris.safetensors", _flux_file())
    return root


def test_flux_loha_on_a_fused_qkv_and_lokr_equal_the_file_changed_by_hand(flux_root, tmp_path):
    note, changed = assert_flux_patch_matches_hand(flux_root, tmp_path, "flux-lycoris.safetensors")
    assert "4 modules patched" in note and "LoHa (3) and LoKr (1)" in note, note
    assert len(changed) == 4, changed  # to_q, to_k, to_v, proj_out


def test_flux_lycoris_beside_fp8_and_paged_weights_equal_the_file_changed_by_hand(flux_root, tmp_path):
    assert_fp8_patch_matches_hand(flux_root, tmp_path, "flux-lycoris.safetensors")
    assert_paged_patch_matches_hand(flux_root, tmp_path, "flux-lycoris.safetensors")


def test_a_lycoris_convolution_on_a_paged_unet_equals_it_on_the_whole_unet(sd1_files, tiny_models_dir, tmp_path):
    """Paged weights rest as placeholders: convolutions add each patch's own delta to the weight brought in
    while they run (nodes.runtime.fp8.as_run_time_patched), so LoHa/LoKr convolutions work there too."""
    from engine.context import Environment, Paths
    from nodes.runtime.models import ModelManager

    g = torch.Generator().manual_seed(4)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g)
    outs = {}
    for name, mode in (("whole", "off"), ("paged", "on")):
        env = Environment(paths=Paths.under(tmp_path / name, models=Path(tiny_models_dir)),
                          models=ModelManager(device="cpu", offload_mode=mode))
        model, _, _ = call(loaders.checkpoint_loader, env, ckpt_name=tm.checkpoint_name("sd1"))
        (m,) = call(lora.lora_loader_model_only, env, model=model, lora_name="sd1-lycoris.safetensors",
                    strength_model=1.0)
        runs = []
        for handle in (model, m, model):
            with handle.unet() as unet, torch.no_grad():
                assert bool(offload.offloaded(unet) and offload.offloaded(unet).paged) == (name == "paged")
                runs.append(unet(x, torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0])
        outs[name] = runs
    assert (outs["whole"][1] - outs["whole"][0]).abs().max() > 1e-3  # the LoRA changes the UNet
    for i in range(3):  # plain, with the LoRA, plain again afterwards
        assert (outs["paged"][i] - outs["whole"][i]).abs().max() <= 1e-5, i
