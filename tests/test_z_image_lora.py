"""Z-Image LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on attention (fused ``qkv`` in the original layout), the output projection,
the MLP, the refiners, the caption embedder and the final layer, written as diffusers/PEFT names, as
ComfyUI's original-layout names (fused qkv: stacked ``down``, block-diagonal ``up``, the same delta)
and as kohya's. The reference is the tiny transformer with each delta merged by hand
(W + scale * up @ down), sampled the same way; every file must agree within 1/255.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

import tiny_flux
import tiny_models
import tiny_z_image
from node_call import call, environment_over
from nodes import lora, split_loaders
from nodes.families import z_image
from nodes.handles import ModelHandle
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
RANK = 4
#: diffusers module -> original module, for the plain ones (written out here, not Kiln's table)
RENAMES = {"layers.0.attention.to_out.0": "layers.0.attention.out",
           "layers.1.feed_forward.w1": "layers.1.feed_forward.w1",
           "layers.0.adaLN_modulation.0": "layers.0.adaLN_modulation.0",
           "noise_refiner.0.feed_forward.w2": "noise_refiner.0.feed_forward.w2",
           "context_refiner.0.attention.to_out.0": "context_refiner.0.attention.out",
           "cap_embedder.1": "cap_embedder.1",
           "all_final_layer.2-1.linear": "final_layer.linear", "all_x_embedder.2-1": "x_embedder"}
FUSED = {"layers.1.attention.qkv": [f"layers.1.attention.to_{q}" for q in "qkv"],
         "noise_refiner.0.attention.qkv": [f"noise_refiner.0.attention.to_{q}" for q in "qkv"]}


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module -> (down [r, in], up [out, r]), seeded."""
    modules = dict(tiny_z_image.components()["transformer"].named_modules())
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

    root = tmp_path_factory.mktemp("z-image-lora")
    tiny_flux._save(root / "diffusion_models" / "tiny-z-image.safetensors", tiny_z_image.original_transformer())
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
    import test_z_image

    clip = test_z_image._clip()
    (out,) = call(ksampler, env, model=model, seed=3, steps=4, cfg=3.0, sampler_name="euler", scheduler="simple",
                  positive=clip.encode("a lighthouse"), negative=clip.encode("blurry"),
                  latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
    return tiny_models.decode(tiny_z_image.components()["vae"], out["samples"])


def _merged(strength: float) -> ModelHandle:
    transformer = copy.deepcopy(tiny_z_image.components()["transformer"])
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, (down, up) in _factors().items():
            modules[name].weight += strength * up @ down
    family = z_image.FAMILY
    return ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(transformer))


@pytest.mark.parametrize("fmt", ["peft", "comfy", "kohya"])
def test_z_image_lora_equals_the_merged_weights(env, fmt):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-z-image.safetensors")
    plain = _sample(env, model)
    for strength in (1.0, 0.5):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=f"{fmt}.safetensors",
                          strength_model=strength)
        ours = _sample(env, patched)
        assert (ours - _sample(env, _merged(strength))).abs().max() <= PIXEL_TOL
        assert (ours - plain).abs().max() > 0.02  # the LoRA changes the image: not vacuous
    assert (_sample(env, model) - plain).abs().max() == 0  # the loaded weights are restored after sampling


def test_original_names_cover_every_parameter():
    net = tiny_z_image.components()["transformer"]
    names = z_image.FAMILY.original_names(net)
    assert names["layers.0.attention.to_k.weight"] == "layers.0.attention.qkv.weight"
    assert names["all_final_layer.2-1.adaLN_modulation.1.bias"] == "final_layer.adaLN_modulation.1.bias"
    assert names["layers.1.attention.norm_q.weight"] == "layers.1.attention.q_norm.weight"
    assert set(names) == {n for n, _ in net.named_parameters()}
