"""Chroma LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on attention (fused in the original layout), MLP, the single blocks'
fused ``linear1``, the approximator and the final layer, written as diffusers/PEFT names, as
ComfyUI's original-layout names (fused modules: stacked ``down``, block-diagonal ``up``, the same
delta) and as kohya's. The reference is the tiny transformer with each delta merged by hand
(W + scale * up @ down), sampled the same way; every file must agree within 1/255.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

import tiny_chroma
import tiny_flux
import tiny_models
from node_call import call, environment_over
from nodes import lora, split_loaders
from nodes.families import chroma
from nodes.handles import ModelHandle
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
RANK = 4
#: diffusers module -> original module, for the plain ones (written out here, not Kiln's table)
RENAMES = {"transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn.proj",
           "transformer_blocks.0.ff.net.0.proj": "double_blocks.0.img_mlp.0",
           "transformer_blocks.0.ff_context.net.2": "double_blocks.0.txt_mlp.2",
           "single_transformer_blocks.0.proj_out": "single_blocks.0.linear2",
           "distilled_guidance_layer.layers.0.linear_1": "distilled_guidance_layer.layers.0.in_layer",
           "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
           "proj_out": "final_layer.linear", "x_embedder": "img_in"}
FUSED = {"double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{q}" for q in "qkv"],
         "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{q}_proj" for q in "qkv"],
         "single_blocks.0.linear1": [f"single_transformer_blocks.0.attn.to_{q}" for q in "qkv"]
         + ["single_transformer_blocks.0.proj_mlp"]}


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module -> (down [r, in], up [out, r]), seeded."""
    modules = dict(tiny_chroma.components()["transformer"].named_modules())
    g = torch.Generator().manual_seed(21)
    out = {}
    for name in list(RENAMES) + [m for parts in FUSED.values() for m in parts]:
        w = modules[name].weight
        out[name] = (torch.randn(RANK, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], RANK, generator=g) * 0.3)
    return out


def _original(factors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {RENAMES[m]: f for m, f in factors.items() if m in RENAMES}
    for name, parts in FUSED.items():
        downs, ups = zip(*(factors[p] for p in parts))
        out[name] = (torch.cat(downs), torch.block_diag(*ups))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("chroma-lora")
    tiny_flux._save(root / "diffusion_models" / "tiny-chroma.safetensors", tiny_chroma.original_transformer())
    (root / "loras").mkdir()
    factors = _factors()
    save_file({f"transformer.{m}.{k}": t.contiguous() for m, (down, up) in factors.items()
               for k, t in (("lora_A.weight", down), ("lora_B.weight", up))}, str(root / "loras" / "peft.safetensors"))
    original = _original(factors)
    save_file({f"diffusion_model.{m}.{k}": t.contiguous() for m, (down, up) in original.items()
               for k, t in (("lora_A.weight", down), ("lora_B.weight", up))}, str(root / "loras" / "comfy.safetensors"))
    kohya = {}
    for m, (down, up) in original.items():
        base = "lora_unet_" + m.replace(".", "_")
        kohya |= {base + ".lora_down.weight": down.contiguous(), base + ".lora_up.weight": (up * 2.0).contiguous(),
                  base + ".alpha": torch.tensor(down.shape[0] / 2.0)}  # alpha / rank = 1/2 undoes the doubling
    save_file(kohya, str(root / "loras" / "kohya.safetensors"))
    return root


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_chroma

    clip = test_chroma._clip()
    (out,) = call(ksampler, env, model=model, seed=3, steps=4, cfg=4.0, sampler_name="euler", scheduler="normal",
                  positive=clip.encode("a lighthouse"), negative=clip.encode("blurry"),
                  latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
    return tiny_models.decode(tiny_chroma.components()["vae"], out["samples"])


def _merged(strength: float) -> ModelHandle:
    transformer = copy.deepcopy(tiny_chroma.components()["transformer"])
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, (down, up) in _factors().items():
            modules[name].weight += strength * up @ down
    return ModelHandle(chroma.FAMILY, scheduler_config=chroma.FAMILY.scheduler_config(), latent=chroma.FAMILY.latent,
                       _use_unet=lambda: contextlib.nullcontext(transformer))


@pytest.mark.parametrize("fmt", ["peft", "comfy", "kohya"])
def test_chroma_lora_equals_the_merged_weights(env, fmt):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-chroma.safetensors")
    plain = _sample(env, model)
    for strength in (1.0, 0.5):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=f"{fmt}.safetensors",
                          strength_model=strength)
        ours = _sample(env, patched)
        assert (ours - _sample(env, _merged(strength))).abs().max() <= PIXEL_TOL
        assert (ours - plain).abs().max() > 0.02  # the LoRA changes the image: not vacuous
    assert (_sample(env, model) - plain).abs().max() == 0  # the loaded weights are restored after sampling


def test_original_names_cover_every_parameter():
    names = chroma.FAMILY.original_names(tiny_chroma.components()["transformer"])
    assert names["transformer_blocks.0.attn.to_k.weight"] == "double_blocks.0.img_attn.qkv.weight"
    assert names["distilled_guidance_layer.norms.1.weight"] == "distilled_guidance_layer.norms.1.scale"
    assert set(names) == {n for n, _ in tiny_chroma.components()["transformer"].named_parameters()}
