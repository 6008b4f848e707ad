"""Ideogram 4 LoRAs in the layouts people have, through UNETLoader + LoraLoaderModelOnly / LoraLoader.

ComfyUI's model holds queries, keys and values as one fused ``layers.N.attention.qkv``; Kiln builds
diffusers' Ideogram4Transformer2DModel, which splits it into ``to_q`` / ``to_k`` / ``to_v``. ComfyUI has
no Ideogram 4 entry in its LoRA key map, so it reads its own model's names (``diffusion_model.``,
kohya's ``lora_unet_``); diffusers' Ideogram 4 conversion reads those too and ``conditional_transformer.``.
The files here:

* ``comfy``, ``kohya``, ``conditional``: random factors on original modules, the fused qkv among them
  (one ``down``, an ``up`` stacking q, k, v), plus (``comfy``) a whole difference on another fused qkv;
* ``peft``, ``kohya-split``: separate factors on to_q, to_v of one block and to_k of the other (each one
  slice of a fused weight) and on plain modules, under diffusers' names.

The reference is independent of Kiln's LoRA code: the delta ``strength * up @ down`` (alpha / rank
undoes the kohya files' doubled ``up``) merged by hand into the ComfyUI-layout weights, a q/k/v LoRA
into its third of the fused qkv, then converted by the key table tests/test_ideogram4.py checks. The
patched model's weights and its output (both passes: with text and image-only) equal it tightly at
strengths 1 and 0.5; strength 0 is the base model bit for bit, and strength 1 moves the output.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import tiny_ideogram4
from flow_family_files import env, save_state  # noqa: F401 (env is a fixture)
from flow_family_lora import (assert_refused, assert_weights_merged_by_hand, lora_file, random_factors,
                              weights_and_output)
from node_call import call
from nodes import lora, split_loaders
from nodes.checkpoint.ideogram4_keys import original_to_diffusers
from nodes.families import ideogram4

UNET, CLIP = "tiny-ideogram4.safetensors", "tiny-qwen3vl_8b.safetensors"
HIDDEN = tiny_ideogram4.HEADS * tiny_ideogram4.HEAD_DIM
#: modules in ComfyUI's (original) layout: the fused qkv, the output projection, MLP, modulation, embedders
ORIGINAL_MODULES = ("layers.0.attention.qkv", "layers.1.attention.o", "layers.0.feed_forward.w2",
                    "layers.1.adaln_modulation", "llm_cond_proj", "final_layer.linear")
#: modules in diffusers' layout: q/k/v each alone (slices of the fused weight) and plain ones
SPLIT_MODULES = ("layers.0.attention.to_q", "layers.0.attention.to_v", "layers.1.attention.to_k",
                 "layers.1.feed_forward.w1", "input_proj", "layers.0.attention.to_out.0")
#: a whole difference (ComfyUI's ``.diff``) on the other block's fused qkv, in the ``comfy`` file
DIFF_MODULE = "layers.1.attention.qkv"
FORMATS = {"comfy": ORIGINAL_MODULES, "kohya": ORIGINAL_MODULES, "conditional": ORIGINAL_MODULES,
           "peft": SPLIT_MODULES, "kohya-split": SPLIT_MODULES}


def _diff() -> torch.Tensor:
    return torch.randn(3 * HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(43)) * 0.05


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down, up), seeded; shapes from the layout the names belong to."""
    if FORMATS[fmt] is ORIGINAL_MODULES:
        weights = tiny_ideogram4.original_state()
    else:
        weights = tiny_ideogram4.components()["transformer"].state_dict()
    return random_factors([(m, tuple(weights[m + ".weight"].shape)) for m in FORMATS[fmt]], seed=42)


def _file(fmt: str) -> dict[str, torch.Tensor]:
    if fmt in ("comfy", "peft"):
        out = lora_file(_factors(fmt), fmt)
        return out | ({f"diffusion_model.{DIFF_MODULE}.diff": _diff()} if fmt == "comfy" else {})
    if fmt == "conditional":
        comfy = lora_file(_factors(fmt), "comfy")
        return {"conditional_transformer." + k[len("diffusion_model."):]: v for k, v in comfy.items()}
    return lora_file(_factors(fmt), "kohya")


def _in_original(module: str) -> tuple[str, slice]:
    """The ComfyUI-layout weight a module's delta goes into and its rows there (written out here:
    to_q / to_k / to_v are the first, second and third ``HIDDEN`` rows of the fused qkv)."""
    m = re.match(r"^(layers\.\d+\.attention\.)to_([qkv])$", module)
    if m:
        part = "qkv".index(m.group(2))
        return m.group(1) + "qkv.weight", slice(part * HIDDEN, (part + 1) * HIDDEN)
    return module.replace(".attention.to_out.0", ".attention.o") + ".weight", slice(None)


def _merged(fmt: str, strength: float) -> torch.nn.Module:
    """The tiny transformer with the file's deltas added by hand in ComfyUI's layout."""
    weights = {k: v.clone() for k, v in tiny_ideogram4.original_state().items()}
    for module, (down, up) in _factors(fmt).items():
        key, rows = _in_original(module)
        weights[key][rows] += strength * up @ down
    if fmt == "comfy":
        weights[DIFF_MODULE + ".weight"] += strength * _diff()
    net = copy.deepcopy(tiny_ideogram4.components()["transformer"])
    net.load_state_dict(original_to_diffusers(weights))
    return net


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_ideogram4.make_models_folder(tmp_path_factory.mktemp("ideogram4-lora"))
    for fmt in FORMATS:
        save_state(root / "loras" / f"{fmt}.safetensors", _file(fmt))
    return root


def _forward(net: torch.nn.Module) -> torch.Tensor:
    """The denoiser on fixed inputs: one entry with text, one image-only (all-zero conditioning)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 128, 2, 3, generator=g)
    text = torch.randn(1, 5, net.config.llm_features_dim, generator=g)
    with torch.no_grad():
        (out,) = ideogram4.FAMILY.wrap_network(net)(x, torch.tensor(600.0), torch.cat([text, torch.zeros_like(text)]))
    return out


def _weights_and_output(model) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return weights_and_output(model, _forward)


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    assert all(m + ".weight" in tiny_ideogram4.original_state() for m in ORIGINAL_MODULES + (DIFF_MODULE,))
    assert all(m + ".weight" in tiny_ideogram4.components()["transformer"].state_dict() for m in SPLIT_MODULES)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ideogram4_lora_equals_the_weights_merged_by_hand(env, fmt):
    """Each q/k/v slice where it belongs (flow_family_lora.assert_weights_merged_by_hand)."""
    assert_weights_merged_by_hand(env, UNET, f"{fmt}.safetensors", lambda strength: _merged(fmt, strength), _forward)


def test_lora_loader_with_clip_patches_the_model_as_model_only_does(env):
    """LoraLoader (MODEL and CLIP): the same model patch, and the Qwen3-VL conditioning untouched (no
    text-encoder modules in the file)."""
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ideogram4")
    patched, patched_clip = call(lora.lora_loader, env, model=model, clip=clip, lora_name="comfy.safetensors",
                                 strength_model=0.5, strength_clip=1.0)
    assert (_weights_and_output(patched)[1] - _forward(_merged("comfy", 0.5))).abs().max() <= 1e-5
    [[ours, _]], [[plain, _]] = patched_clip.encode("a fox"), clip.encode("a fox")
    assert torch.equal(ours, plain)


def test_diffusers_reads_the_original_names_onto_the_modules_kiln_patches():
    """diffusers' Ideogram 4 LoRA conversion (fused qkv split onto to_q/k/v, ``o`` -> ``to_out.0``) gives the
    modules Kiln's table gives for the block modules, and the same up rows for each part of the qkv."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ideogram4_lora_to_diffusers

    from nodes.checkpoint.ideogram4_keys import lora_modules

    blocks = {m: f for m, f in _factors("comfy").items() if m.startswith("layers.")}
    theirs = _convert_non_diffusers_ideogram4_lora_to_diffusers(lora_file(blocks, "comfy"))
    ours = lora_modules({k: tuple(v.shape) for k, v in tiny_ideogram4.components()["transformer"].state_dict().items()})
    covered = {}
    for module in blocks:
        target = ours[module]
        for name, rows in ([(target, None)] if isinstance(target, str) else target):
            covered[name[: -len(".weight")]] = (module, rows)
    assert {k[len("transformer."): -len(".lora_B.weight")] for k in theirs if k.endswith(".lora_B.weight")} == \
        set(covered)
    for name, (module, rows) in covered.items():
        up = blocks[module][1] if rows is None else blocks[module][1][rows[0][0]:rows[0][1]]
        assert torch.equal(theirs[f"transformer.{name}.lora_B.weight"], up)


def test_a_lora_for_another_family_is_refused_naming_the_input(env, root):
    """A FLUX LoRA (its names fit nothing) and one with Ideogram 4's names at another model's sizes (a
    Z-Image-style NextDiT's qkv) are errors on ``lora_name``, through either loader node."""
    save_state(root / "loras" / "flux.safetensors",
               {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 3072),
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(9216, 4)})
    save_state(root / "loras" / "other-sizes.safetensors",
               {"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(4, 96),
                "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(288, 4)})
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="ideogram4")
    assert_refused(env, model, clip, "ideogram4",
                   (("flux.safetensors", "FLUX LoRA"), ("other-sizes.safetensors", "does not fit")))
