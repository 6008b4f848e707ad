"""What the LoRA-format tests share: reading a model's weights, a tiny FLUX written beside its
hand-changed copies, and the UNet forward compared with a UNet that holds hand-made weights.

Each format's test module writes its own files and its own "by hand" weights from the published
formulas; only the plumbing around them lives here, so that the formats are checked the same way.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

import tiny_flux
from engine.context import Environment, Paths
from node_call import Called, call
from nodes import lora
from nodes.runtime.models import ModelManager
from nodes.sampling import ksampler
from test_flux_lora import _cond

State = dict[str, torch.Tensor]


def states(model, clip, encoders: tuple[str, ...] = ("text_encoder",)) -> dict[str, State]:
    """Copies of the UNet's and the named text encoders' weights, keyed "unet" and by encoder."""
    out = {"unet": net_state(model)}
    for name in encoders:
        with clip.encoder(name) as te:
            out[name] = {k: v.detach().clone() for k, v in te.state_dict().items()}
    return out


def net_state(model) -> State:
    with model.unet() as net:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


def patched_states(env: Environment, model, clip, lora_name: str, strength: float) -> tuple[dict[str, State], str]:
    """The UNet's and CLIP's weights with the LoRA at ``strength`` on both, and the loader's message."""
    rec = Called()
    m, c = call(lora.lora_loader, env, rec, model=model, clip=clip, lora_name=lora_name,
                strength_model=strength, strength_clip=strength)
    return states(m, c), rec.messages[0]


def assert_unet_matches_hand(model, patched, hand: Callable[[State], State]) -> None:
    """Not only the weights: on one input, the patched SD1 UNet predicts what a copy of the base holding
    ``hand(base weights)`` predicts, differs from the base, and the base predicts as before afterwards."""
    g = torch.Generator().manual_seed(41)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        with model.unet() as unet:
            by_hand = copy.deepcopy(unet)
            plain = unet(x, t, encoder_hidden_states=ctx).sample
        by_hand.load_state_dict(hand(by_hand.state_dict()))
        expected = by_hand(x, t, encoder_hidden_states=ctx).sample
        with patched.unet() as unet:
            ours = unet(x, t, encoder_hidden_states=ctx).sample
        with model.unet() as unet:
            after = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(ours, expected, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3
    assert torch.equal(after, plain)


def assert_strength_zero_is_the_base(env: Environment, model, clip, lora_name: str, base: dict[str, State]) -> None:
    """Strength 0 gives the base byte for byte, and so does the base itself after every earlier use."""
    zero = call(lora.lora_loader, env, model=model, clip=clip, lora_name=lora_name,
                strength_model=0.0, strength_clip=0.0)
    for got in (states(*zero), states(model, clip)):
        assert all(torch.equal(v, base[t][k]) for t in base for k, v in got[t].items())


# -- a tiny FLUX ----------------------------------------------------------------------------------

def write_flux_models(root: Path, hand: Callable[[State], State]) -> State:
    """``diffusion_models/`` under root: the BFL-layout base, ``hand(base)``, the base in fp8 and
    ``hand`` of the fp8 values upcast to fp32 (what a patch beside fp8 weights must equal).
    Returns the base's weights."""
    bfl = tiny_flux.bfl_transformer("dev")
    models = root / "diffusion_models"
    tiny_flux._save(models / "base.safetensors", bfl)
    tiny_flux._save(models / "hand.safetensors", hand(bfl))
    fp8 = tiny_flux.to_fp8(bfl)
    tiny_flux._save(models / "fp8.safetensors", fp8)
    upcast = {k: v.float() if v.dtype == torch.float8_e4m3fn else v for k, v in fp8.items()}
    tiny_flux._save(models / "fp8-hand.safetensors", hand(upcast))
    return bfl


def flux_env(root: Path, tmp_path: Path, **manager: object) -> Environment:
    return Environment(paths=Paths.under(tmp_path / "data", models=root), models=ModelManager(device="cpu", **manager))


def flux_sample(env: Environment, model) -> torch.Tensor:
    """Three euler steps of FLUX image-to-image from a fixed latent (the prompt of test_flux_lora)."""
    embeds, pooled = _cond()
    cond = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    start = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    (out,) = call(ksampler, env, model=model, seed=3, steps=3, cfg=1.0, sampler_name="euler", scheduler="normal",
                  positive=cond, negative=cond, latent_image={"samples": start}, denoise=0.6)
    return out["samples"]


def assert_flux_patch_matches_hand(root: Path, tmp_path: Path, lora_name: str) -> tuple[str, list[str]]:
    """The LoRA on the BFL base gives the hand-changed file's weights (within 1e-6) and leaves the base as
    it was. Returns the loader's message and the names of the parameters it changed."""
    from nodes import split_loaders

    env = flux_env(root, tmp_path)
    (base,) = call(split_loaders.unet_loader, env, unet_name="base.safetensors")
    (hand,) = call(split_loaders.unet_loader, env, unet_name="hand.safetensors")
    before, expected = net_state(base), net_state(hand)
    rec = Called()
    ours = net_state(with_lora(env, base, lora_name, rec=rec))
    assert "not matched" not in rec.messages[0], rec.messages
    assert all(torch.allclose(ours[k], expected[k], atol=1e-6, rtol=0) for k in ours)
    assert all(torch.equal(v, before[k]) for k, v in net_state(base).items())
    return rec.messages[0], [k for k in ours if not torch.equal(ours[k], before[k])]


def with_lora(env: Environment, model, name: str, strength: float = 1.0, rec: Called | None = None):
    return call(lora.lora_loader_model_only, env, rec, model=model, lora_name=name, strength_model=strength)[0]


def stored_bytes(model) -> State:
    """The weights as stored, fp8 ones as their raw bytes (fp8 has no equality of its own)."""
    with model.unet() as net:
        return {k: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v.clone()
                for k, v in net.state_dict().items()}


def assert_fp8_patch_matches_hand(root: Path, tmp_path: Path, lora_name: str) -> None:
    """A LoRA beside fp8 weights gives the upcast hand-made model's latents, changes the result, leaves
    the stored bytes and no patch state on the layers, and at strength 0 is the plain model."""
    from nodes import split_loaders

    env = flux_env(root, tmp_path / "fp8")
    (fp8,) = call(split_loaders.unet_loader, env, unet_name="fp8.safetensors")
    (hand,) = call(split_loaders.unet_loader, env, unet_name="fp8-hand.safetensors")
    with fp8.unet() as net:
        assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    stored = stored_bytes(fp8)
    plain = flux_sample(env, fp8)
    ours = flux_sample(env, with_lora(env, fp8, lora_name))
    assert (ours - flux_sample(env, hand)).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-3
    assert torch.equal(flux_sample(env, with_lora(env, fp8, lora_name, 0.0)), plain)
    after = stored_bytes(fp8)
    assert all(torch.equal(stored[k], v) for k, v in after.items())
    with fp8.unet() as net:
        assert not any("kiln_lora" in vars(m) for m in net.modules())


def assert_paged_patch_matches_hand(root: Path, tmp_path: Path,
                                    lora_name: str) -> tuple[Environment, object, torch.Tensor]:
    """A LoRA on the base paged to disk gives the whole hand-made model's latents, changes the result,
    and leaves the paged base as it was. Returns the paged environment, model and patched latents for further checks."""
    from nodes import split_loaders
    from nodes.runtime import offload

    whole = flux_env(root, tmp_path / "whole")
    expected = flux_sample(whole, call(split_loaders.unet_loader, whole, unet_name="hand.safetensors")[0])
    env = flux_env(root, tmp_path / "paged", offload_mode="on")
    (model,) = call(split_loaders.unet_loader, env, unet_name="base.safetensors")
    plain = flux_sample(env, model)
    with model.unet() as net:
        assert offload.offloaded(net).paged  # not vacuous: the weights at rest are placeholders
    ours = flux_sample(env, with_lora(env, model, lora_name))
    assert (ours - expected).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-3
    assert torch.equal(flux_sample(env, model), plain)  # the base afterwards
    return env, model, ours


def flux_lora_beside_stored_vs_dequantised(env: Environment, root: Path, files: tuple[str, str], lora_name: str,
                                           modules: tuple[str, ...], dora: str | None = None) -> tuple[float, float]:
    """A rank-2 LoRA on the tiny FLUX's BFL ``modules`` (a DoRA magnitude on ``dora``) loaded over a
    quantised UNETLoader file and over its dequantised twin (``files``). Returns (the largest output
    difference between the two, how far the LoRA moves the quantised model's output): on the stored
    weights the LoRA runs beside them, on the twin it is added in place, so the two agree only as far
    as rounding when the quantised layers apply their scales (and rotations) right."""
    from safetensors.torch import save_file

    from nodes import split_loaders

    hidden = tiny_flux.HEADS * tiny_flux.HEAD_DIM
    rows = {"double_blocks.0.img_attn.qkv": 3 * hidden, "single_blocks.0.linear1": 7 * hidden,
            "final_layer.adaLN_modulation.1": 2 * hidden, "double_blocks.0.img_attn.proj": hidden,
            "double_blocks.0.img_mlp.0": 4 * hidden}
    g = torch.Generator().manual_seed(4)
    factors = {}
    for module in modules:
        factors[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(2, hidden, generator=g) * 0.3
        factors[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(rows[module], 2, generator=g) * 0.3
    if dora is not None:  # one magnitude per output row
        factors[f"diffusion_model.{dora}.dora_scale"] = torch.rand(rows[dora], 1, generator=g) + 0.5
    (root / "loras").mkdir(exist_ok=True)
    save_file(factors, str(root / "loras" / lora_name))
    outs = {}
    for name in files:
        (model,) = call(split_loaders.unet_loader, env, unet_name=name)
        with with_lora(env, model, lora_name).unet() as net:
            outs[name] = tiny_flux.forward(net)
        with model.unet() as net:
            outs[name + "-base"] = tiny_flux.forward(net)
    stored, twin = files
    return (float((outs[stored] - outs[twin]).abs().max()),
            float((outs[stored] - outs[stored + "-base"]).abs().max()))
