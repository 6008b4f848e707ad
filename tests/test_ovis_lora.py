"""Ovis-Image LoRAs in the layouts people have, through UNETLoader + LoraLoaderModelOnly / LoraLoader.

ComfyUI's model keeps a double block's gated MLP as three linears, ``img_mlp.gate_proj`` / ``up_proj`` /
``down_proj`` (``txt_mlp`` likewise); Kiln builds diffusers' OvisImageTransformer2DModel, whose
``ff.net.0.proj`` fuses up (first half of the rows) and gate (second half). A LoRA in ComfyUI's names
(``diffusion_model.``, kohya's ``lora_unet_``) on either projection must land in its half of the rows;
q/k/v and a single block's ``linear1`` split as FLUX's do. The files here:

* ``comfy``, ``kohya``: random factors on ComfyUI's modules: up and gate of the image MLP (both halves of
  one fused weight), the text MLP's gate alone, the fused qkv, ``linear1``, ``down_proj``, ``txt_in``; plus
  (``comfy``) a whole difference on the text MLP's up projection, a bias difference on the image MLP's gate
  and one on the text norm;
* ``peft``: factors under diffusers' names (the fused MLP input whole, ``to_q``, ``proj_mlp``, ...).

The reference is independent of Kiln's LoRA code: the delta ``strength * up @ down`` (alpha / rank undoes
the kohya file's doubled ``up``) merged by hand into the ComfyUI-layout weights (the peft file's into
diffusers' own), then converted by the key table tests/test_ovis.py checks. The patched model's weights and
output equal it tightly at strengths 1 and 0.5; strength 0 is the base bit for bit; the LoRA moves the
output. With UNETLoader's fp8 weight_dtype the factors run beside the fp8 weights (one pair of block
factors for the two halves) and equal the fp8-rounded weights merged by hand.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import tiny_ovis
from flow_family_files import env, save_state  # noqa: F401 (env is a fixture)
from flow_family_lora import (assert_refused, assert_weights_merged_by_hand, lora_file, random_factors,
                              weights_and_output)
from node_call import call
from nodes import lora, split_loaders
from nodes.checkpoint.ovis_keys import original_to_diffusers
from nodes.families import ovis

UNET, CLIP = "tiny-ovis.safetensors", tiny_ovis.TEXT
#: ComfyUI's modules: both halves of the image MLP input, the text MLP's gate alone, fused ones, plain ones
ORIGINAL_MODULES = ("double_blocks.0.img_mlp.up_proj", "double_blocks.0.img_mlp.gate_proj",
                    "double_blocks.0.txt_mlp.gate_proj", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1",
                    "double_blocks.0.img_mlp.down_proj", "txt_in")
#: diffusers' modules: the fused MLP input whole, a slice of a fused qkv, the single block's MLP input
SPLIT_MODULES = ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.attn.to_q",
                 "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff_context.net.2")
#: the ``comfy`` file's whole differences: (module + suffix, the ComfyUI-layout tensor it adds to)
DIFFS = {"double_blocks.0.txt_mlp.up_proj.diff": "double_blocks.0.txt_mlp.up_proj.weight",
         "double_blocks.0.img_mlp.gate_proj.diff_b": "double_blocks.0.img_mlp.gate_proj.bias",
         "txt_norm.diff": "txt_norm.weight"}
FORMATS = {"comfy": ORIGINAL_MODULES, "kohya": ORIGINAL_MODULES, "peft": SPLIT_MODULES}


def _diffs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(43)
    shapes = tiny_ovis.original_transformer()
    return {k: torch.randn(shapes[w].shape, generator=g) * 0.05 for k, w in DIFFS.items()}


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down, up), seeded; shapes from the layout the names belong to."""
    weights = tiny_ovis.original_transformer() if fmt != "peft" else tiny_ovis.components()["transformer"].state_dict()
    return random_factors([(m, tuple(weights[m + ".weight"].shape)) for m in FORMATS[fmt]], seed=42)


def _file(fmt: str) -> dict[str, torch.Tensor]:
    out = lora_file(_factors(fmt), fmt)
    return out | ({"diffusion_model." + k: v for k, v in _diffs().items()} if fmt == "comfy" else {})


def _merged(fmt: str, strength: float, fp8: bool = False) -> torch.nn.Module:
    """The tiny transformer with the file's deltas added by hand: into ComfyUI's layout (``peft``: into
    diffusers'); ``fp8``: the linear weights first rounded to fp8 as UNETLoader's weight_dtype stores them."""
    base = tiny_ovis.original_transformer() if fmt != "peft" else tiny_ovis.components()["transformer"].state_dict()
    weights = {k: v.detach().clone() for k, v in base.items()}
    if fp8:
        weights = {k: v.to(torch.float8_e4m3fn).float() if v.ndim == 2 and k.endswith(".weight") else v
                   for k, v in weights.items()}
    for module, (down, up) in _factors(fmt).items():
        weights[module + ".weight"] += strength * up @ down
    if fmt == "comfy":
        for key, diff in _diffs().items():
            weights[DIFFS[key]] += strength * diff
    net = copy.deepcopy(tiny_ovis.components()["transformer"])
    net.load_state_dict(weights if fmt == "peft" else original_to_diffusers(weights))
    return net


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The tiny transformer in ComfyUI's layout, Ovis 2.5's tiny Qwen3, and the LoRA files."""
    root = tmp_path_factory.mktemp("ovis-lora")
    save_state(root / "diffusion_models" / UNET, tiny_ovis.original_transformer())
    save_state(root / "text_encoders" / CLIP, tiny_ovis.qwen3_file())
    for fmt in FORMATS:
        save_state(root / "loras" / f"{fmt}.safetensors", _file(fmt))
    return root


def _forward(net: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x, text = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 6, 48, generator=g)
    with torch.no_grad():
        (out,) = ovis.FAMILY.wrap_network(net)(x, torch.tensor(600.0), text)
    return out


def _weights_and_output(model) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return weights_and_output(model, _forward)


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    original = tiny_ovis.original_transformer()
    assert all(m + ".weight" in original for m in ORIGINAL_MODULES) and set(DIFFS.values()) <= set(original)
    assert all(m + ".weight" in tiny_ovis.components()["transformer"].state_dict() for m in SPLIT_MODULES)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ovis_lora_equals_the_weights_merged_by_hand(env, fmt):
    """Up and gate each in their half of the fused MLP input (flow_family_lora.assert_weights_merged_by_hand)."""
    base_weights, weights, moved = assert_weights_merged_by_hand(env, UNET, f"{fmt}.safetensors",
                                                                 lambda strength: _merged(fmt, strength), _forward)
    if fmt != "peft":  # both halves of the image MLP input, and the text MLP's gate half alone
        fused, text = "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.ff_context.net.0.proj.weight"
        half = base_weights[text].shape[0] // 2
        assert fused in moved and not torch.equal(weights[text][half:], base_weights[text][half:])
        if fmt == "kohya":  # no difference on the text MLP's up half in this file
            assert torch.equal(weights[text][:half], base_weights[text][:half])


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_a_lora_beside_fp8_weights_equals_the_rounded_weights_merged_by_hand(env, fmt):
    """UNETLoader's fp8 weight_dtype keeps the linear weights fp8, so the LoRA runs beside them: the up and
    gate factors as one pair of block factors on the fused layer (kohya's alpha / rank in each), the bias
    and norm differences added."""
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET, weight_dtype="fp8_e4m3fn")
    with model.unet() as net:
        assert net.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.float8_e4m3fn
    base = _weights_and_output(model)[1]
    (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=f"{fmt}.safetensors",
                      strength_model=0.5)
    with patched.unet() as net:  # beside the fp8 weight, not added into it
        assert net.transformer_blocks[0].ff.net[0].proj.kiln_lora
    out = _weights_and_output(patched)[1]
    assert (out - _forward(_merged(fmt, 0.5, fp8=True))).abs().max() <= 1e-4
    assert (out - base).abs().max() > 1e-2
    assert torch.equal(_weights_and_output(model)[1], base)


def test_lora_loader_with_clip_patches_the_model_as_model_only_does(env):
    """LoraLoader (MODEL and CLIP): the same model patch, the Qwen3 conditioning untouched (no text-encoder
    modules in the file)."""
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ovis")
    patched, patched_clip = call(lora.lora_loader, env, model=model, clip=clip, lora_name="kohya.safetensors",
                                 strength_model=0.5, strength_clip=1.0)
    assert (_weights_and_output(patched)[1] - _forward(_merged("kohya", 0.5))).abs().max() <= 1e-5
    [[ours, _]], [[plain, _]] = patched_clip.encode("a fox"), clip.encode("a fox")
    assert torch.equal(ours, plain)


def test_a_lora_for_another_family_is_refused_naming_the_input(env, root):
    """A FLUX.1 LoRA (a GELU MLP's ``img_mlp.0`` and the released width: nothing of Ovis's fits) and one with
    Ovis's names at another model's sizes are errors on ``lora_name``, through either loader node."""
    save_state(root / "loras" / "flux.safetensors",
               {"diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight": torch.zeros(4, 3072),
                "diffusion_model.double_blocks.0.img_mlp.0.lora_B.weight": torch.zeros(12288, 4)})
    save_state(root / "loras" / "other-sizes.safetensors",
               {"diffusion_model.double_blocks.0.img_mlp.gate_proj.lora_A.weight": torch.zeros(4, 96),
                "diffusion_model.double_blocks.0.img_mlp.gate_proj.lora_B.weight": torch.zeros(288, 4)})
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ovis")
    assert_refused(env, model, clip, "ovis",
                   (("flux.safetensors", "FLUX LoRA"), ("other-sizes.safetensors", "does not fit")))


def test_dora_on_the_gate_and_up_projections_decomposes_each_half_as_its_own_layer(env, root):
    """DoRA on ComfyUI's separate projections normalises each alone: the gate's magnitudes per output row, the
    up projection's per input column over its own rows only. Kiln's fused weight gets each half so (the norms
    written out here: ``m * (W + dW) / ||W + dW||``), the other weights untouched."""
    original = tiny_ovis.original_transformer()
    factors = _factors("comfy")
    g = torch.Generator().manual_seed(7)
    gate, up = "double_blocks.0.img_mlp.gate_proj", "double_blocks.0.img_mlp.up_proj"
    rows, cols = original[gate + ".weight"].shape
    scales = {gate: torch.rand(rows, 1, generator=g) + 0.5, up: torch.rand(1, cols, generator=g) + 0.5}
    file = lora_file({m: factors[m] for m in (gate, up)}, "comfy")
    file |= {f"diffusion_model.{m}.dora_scale": s for m, s in scales.items()}
    save_state(root / "loras" / "dora.safetensors", file)
    weights = {k: v.clone() for k, v in original.items()}
    eps = torch.finfo(torch.float32).eps
    for module, dim in ((gate, 1), (up, 0)):
        down, u = factors[module]
        merged = weights[module + ".weight"] + u @ down
        weights[module + ".weight"] = scales[module] * merged / (merged.norm(dim=dim, keepdim=True) + eps)
    want = original_to_diffusers(weights)
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    base = _weights_and_output(model)[0]
    (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name="dora.safetensors", strength_model=1.0)
    got = _weights_and_output(patched)[0]
    fused = "transformer_blocks.0.ff.net.0.proj.weight"
    assert torch.allclose(got[fused], want[fused], atol=1e-5, rtol=0)
    assert not torch.allclose(got[fused], base[fused], atol=1e-3)
    assert all(torch.equal(got[k], base[k]) for k in base if k != fused)
