"""Qwen-Image LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on image and text attention, both MLPs, the modulation and the output
projection, written as diffusers/PEFT names (``transformer.``), as ComfyUI's (``diffusion_model.``),
bare with ``lora_down``/``lora_up``/``alpha`` (lightx2v's Qwen-Image-Lightning files), as kohya's /
musubi's ``lora_unet_`` names and SimpleTuner's ``lycoris_`` names. ComfyUI's Qwen-Image keys are
diffusers' own names, so every layout names the same modules. The reference is the tiny transformer
with each delta merged by hand (W + scale * up @ down), sampled the same way; every file must agree
within 1/255.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

import tiny_qwen_image
from node_call import call, environment_over
from nodes import lora, split_loaders
from nodes.families import qwen_image
from nodes.handles import ModelHandle
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
RANK = 4
MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
           "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.attn.to_add_out", "transformer_blocks.0.img_mlp.net.0.proj",
           "transformer_blocks.1.txt_mlp.net.2", "transformer_blocks.0.img_mod.1", "img_in", "txt_in", "proj_out")
FORMATS = ("peft", "comfy", "lightning", "kohya", "lycoris")


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down [r, in], up [out, r]), seeded."""
    modules = dict(tiny_qwen_image.components()["transformer"].named_modules())
    g = torch.Generator().manual_seed(21)
    out = {}
    for name in MODULES:
        w = modules[name].weight
        out[name] = (torch.randn(RANK, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], RANK, generator=g) * 0.3)
    return out


def _file(fmt: str) -> dict[str, torch.Tensor]:
    out = {}
    for m, (down, up) in _factors().items():
        if fmt in ("peft", "comfy"):
            base = ("transformer." if fmt == "peft" else "diffusion_model.") + m
            out |= {base + ".lora_A.weight": down, base + ".lora_B.weight": up}
            continue
        base = {"lightning": m, "kohya": "lora_unet_" + m.replace(".", "_"),
                "lycoris": "lycoris_" + m.replace(".", "_")}[fmt]
        out |= {base + ".lora_down.weight": down, base + ".lora_up.weight": up * 2.0,
                base + ".alpha": torch.tensor(RANK / 2.0)}  # alpha / rank = 1/2 undoes the doubling
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("qwen-image-lora")
    (root / "diffusion_models").mkdir()
    (root / "loras").mkdir()
    state = {k: v.contiguous() for k, v in tiny_qwen_image.components()["transformer"].state_dict().items()}
    save_file(state, str(root / "diffusion_models" / "tiny-qwen_image.safetensors"))
    for fmt in FORMATS:
        save_file(_file(fmt), str(root / "loras" / f"{fmt}.safetensors"))
    return root


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_qwen_image

    clip, vae = test_qwen_image._clip(), test_qwen_image._vae()
    (out,) = call(ksampler, env, model=model, seed=3, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal",
                  positive=clip.encode("a lighthouse"), negative=clip.encode("blurry"),
                  latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
    return vae.decode(out["samples"])


def _merged(strength: float) -> ModelHandle:
    transformer = copy.deepcopy(tiny_qwen_image.components()["transformer"])
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, (down, up) in _factors().items():
            modules[name].weight += strength * up @ down
    family = qwen_image.FAMILY
    return ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(transformer))


@pytest.mark.parametrize("fmt", FORMATS)
def test_qwen_image_lora_equals_the_merged_weights(env, fmt):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-qwen_image.safetensors")
    plain = _sample(env, model)
    for strength in (1.0, 0.5):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=f"{fmt}.safetensors",
                          strength_model=strength)
        ours = _sample(env, patched)
        assert (ours - _sample(env, _merged(strength))).abs().max() <= PIXEL_TOL
        assert (ours - plain).abs().max() > 0.02  # the LoRA changes the image: not vacuous
    assert (_sample(env, model) - plain).abs().max() == 0  # the loaded weights are restored after sampling
