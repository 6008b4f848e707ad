"""FLUX.2 [klein] LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on the fused image qkv, a text-stream projection, the fused single-block
``linear1``, an MLP and the image input, written against diffusers' module names (PEFT,
``transformer.``) and against BFL's original layout (ComfyUI's ``diffusion_model.``, kohya's
``lora_unet_``). The reference is independent of Kiln's LoRA code: each delta merged by hand into
the weights of its own layout (an original-layout delta into the BFL state dict, converted back by
the key table that tests/test_flux2_loading.py checks against diffusers' converter). Every file
must agree with its reference within 1/255, and move the image.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

import tiny_flux2
from node_call import call, environment_over
from nodes import lora, split_loaders
from nodes.checkpoint.flux2_keys import original_to_diffusers
from nodes.families import flux2
from nodes.handles import ModelHandle
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
RANK = 4
#: diffusers module names (PEFT files) and BFL module names (ComfyUI / kohya files).
DIFFUSERS_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                     "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "transformer_blocks.0.ff.linear_out", "x_embedder")
ORIGINAL_MODULES = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1",
                    "double_blocks.0.img_mlp.2", "img_in")
FORMATS = ("peft", "comfy", "kohya")


def _weights(fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "peft":
        return {k: v for k, v in tiny_flux2.components()["transformer"].state_dict().items()}
    return tiny_flux2.original_transformer()


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down [r, in], up [out, r]), seeded per layout."""
    weights = _weights(fmt)
    modules = DIFFUSERS_MODULES if fmt == "peft" else ORIGINAL_MODULES
    g = torch.Generator().manual_seed(31)
    out = {}
    for name in modules:
        rows, cols = weights[name + ".weight"].shape
        out[name] = (torch.randn(RANK, cols, generator=g) * 0.3, torch.randn(rows, RANK, generator=g) * 0.3)
    return out


def _file(fmt: str) -> dict[str, torch.Tensor]:
    out = {}
    for m, (down, up) in _factors(fmt).items():
        if fmt in ("peft", "comfy"):
            base = ("transformer." if fmt == "peft" else "diffusion_model.") + m
            out |= {base + ".lora_A.weight": down, base + ".lora_B.weight": up}
        else:
            base = "lora_unet_" + m.replace(".", "_")
            out |= {base + ".lora_down.weight": down, base + ".lora_up.weight": up * 2.0,
                    base + ".alpha": torch.tensor(RANK / 2.0)}  # alpha / rank = 1/2 undoes the doubling
    return {k: v.contiguous() for k, v in out.items()}


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    peft, original = _weights("peft"), _weights("comfy")
    assert all(m + ".weight" in peft for m in DIFFUSERS_MODULES)
    assert all(m + ".weight" in original for m in ORIGINAL_MODULES)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("flux2-lora")
    (root / "diffusion_models").mkdir()
    (root / "loras").mkdir()
    state = {k: v.contiguous() for k, v in tiny_flux2.original_transformer().items()}
    save_file(state, str(root / "diffusion_models" / "flux-2-klein-tiny.safetensors"))
    for fmt in FORMATS:
        save_file(_file(fmt), str(root / "loras" / f"{fmt}.safetensors"))
    return root


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_flux2

    clip, vae = test_flux2._clip(), test_flux2._vae()
    (out,) = call(ksampler, env, model=model, seed=3, steps=3, cfg=1.0, sampler_name="euler", scheduler="normal",
                  positive=clip.encode("a lighthouse"), negative=clip.encode(""),
                  latent_image={"samples": torch.zeros(1, 128, 4, 4)}, denoise=1.0)
    return vae.decode(out["samples"])


def _merged(fmt: str, strength: float) -> ModelHandle:
    """The tiny transformer with every delta added by hand in the LoRA's own layout."""
    weights = {k: v.clone() for k, v in _weights(fmt).items()}
    for name, (down, up) in _factors(fmt).items():
        weights[name + ".weight"] += strength * up @ down
    transformer = copy.deepcopy(tiny_flux2.components()["transformer"])
    transformer.load_state_dict(weights if fmt == "peft" else original_to_diffusers(weights))
    family = flux2.FAMILY
    return ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(transformer))


@pytest.mark.parametrize("fmt", FORMATS)
def test_flux2_lora_equals_the_merged_weights(env, fmt):
    (model,) = call(split_loaders.unet_loader, env, unet_name="flux-2-klein-tiny.safetensors")
    plain = _sample(env, model)
    for strength in (1.0, 0.5):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=f"{fmt}.safetensors",
                          strength_model=strength)
        ours = _sample(env, patched)
        assert (ours - _sample(env, _merged(fmt, strength))).abs().max() <= PIXEL_TOL
        assert (ours - plain).abs().max() > 0.02  # the LoRA changes the image: not vacuous
    assert (_sample(env, model) - plain).abs().max() == 0  # the loaded weights are restored after sampling
