"""Comfy-Org's int8 files (``*_int8_convrot``, ``comfy_quant`` format ``int8_tensorwise``) through the real loaders.

The files are written by comfy-kitchen, the library ComfyUI's own int8 layers come from: its eager
quantiser turns every other linear weight of the tiny FLUX, Qwen-Image, Z-Image, FLUX.2, Chroma,
SD3 and T5 into int8 with one
scale per output row, most of them with their columns rotated in groups of 16 first (ConvRot; the
marker's ``convrot`` flag flat or nested in ``params``, as both occur), some with one scale per
tensor; the rest stay float32. The twin file holds comfy-kitchen's own dequantisation of the same
tensors. Kiln must load the int8 file to the twin's effective weights while holding the int8 bytes,
compute the same outputs (it rotates a layer's input rather than its weight: the same product,
rounded differently), sample the same pixels, and take LoRAs and DoRAs the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_kitchen.backends.eager import quantization as ck

import tiny_chroma
import tiny_flux
import tiny_flux2
import tiny_qwen_image
import tiny_sd3
import tiny_z_image
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from node_call import Called, call, environment_over
from nodes import split_loaders
from nodes.runtime.fp8 import cast_linear_class, effective_weight, rotation_group, weight_scale

GROUP = 16


def _marker(config: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def quantise_int8(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """(int8 file, its dequantised float32 twin) of ``state`` under ``prefix``, by comfy-kitchen."""
    out, twin = {}, {}
    for k, v in state.items():
        out[prefix + k] = twin[prefix + k] = v.detach()
    linears = [k for k, v in sorted(state.items()) if v.ndim == 2 and k.endswith(".weight") and "embed" not in k
               and not k.startswith("shared")]
    for i, k in enumerate(linears):
        if i % 2:
            continue  # left float32: a mixed file
        w, layer = state[k].detach().float(), prefix + k[: -len(".weight")]
        if i % 6 == 4 or w.shape[1] % GROUP:  # plain int8: one scale per row, or per tensor
            q, s = ck.quantize_int8_rowwise(w) if i % 12 == 4 else ck.quantize_int8_tensorwise(w)
            plain, config = ck.dequantize_int8_simple(q, s), {"format": "int8_tensorwise"}
        else:
            q, s = ck.quantize_int8_convrot_weight(w, GROUP)
            plain = ck.dequantize_int8_convrot_weight(q, s, GROUP)
            rotation = {"convrot": True, "convrot_groupsize": GROUP}
            config = {"format": "int8_tensorwise", **(rotation if i % 4 == 0 else {"params": rotation})}
        out[layer + ".weight"], twin[layer + ".weight"] = q, plain
        out[layer + ".weight_scale"], out[layer + ".comfy_quant"] = s.float(), _marker(config)
    return out, twin


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("int8-models")
    files = {"diffusion_models/flux": (tiny_flux.bfl_transformer("dev"), "model.diffusion_model."),
             "diffusion_models/qwen_image": (tiny_qwen_image.components()["transformer"].state_dict(), ""),
             "diffusion_models/flux-diffusers-keys": (tiny_flux.components("dev")["transformer"].state_dict(), ""),
             "diffusion_models/z_image": (tiny_z_image.original_transformer(), ""),
             "diffusion_models/flux2": (tiny_flux2.original_transformer(), ""),
             "diffusion_models/chroma": (tiny_chroma.original_transformer(), ""),
             "diffusion_models/sd3": (tiny_sd3.original_transformer("large"), ""),
             "text_encoders/t5": (tiny_flux.t5_state(), ""),
             "text_encoders/qwen3": (tiny_z_image.qwen3_file(), "")}
    for name, (state, prefix) in files.items():
        int8, twin = quantise_int8(state, prefix)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in int8.items()}, str(root / f"{name}-int8.safetensors"))
        save_file({k: v.contiguous() for k, v in twin.items()}, str(root / f"{name}-dequant.safetensors"))
    tiny_flux._save(root / "text_encoders" / "clip_l.safetensors", tiny_flux.clip_l_state())
    tiny_flux._save(root / "vae" / "flux-ae.safetensors", tiny_flux.vae_state())
    return root


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


def _compare(int8_net, plain_net) -> list:
    """The int8 net's effective weights equal the twin's (comfy-kitchen's dequantisation); returns its
    int8 layers, checked to be CastLinear holding int8."""
    a = {n: m for n, m in int8_net.named_modules() if isinstance(m, torch.nn.Linear)}
    b = {n: m for n, m in plain_net.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(a) == set(b)
    gaps = {n: float((effective_weight(a[n], torch.float32) - b[n].weight.float()).abs().max()) for n in a}
    assert max(gaps.values()) < 1e-6, max(gaps.items(), key=lambda kv: kv[1])
    layers = [m for m in a.values() if m.weight.dtype == torch.int8]
    assert layers and all(type(m) is cast_linear_class() and weight_scale(m) is not None for m in layers)
    return layers


@pytest.mark.parametrize("family", ["flux", "flux-diffusers-keys", "qwen_image", "z_image", "flux2", "chroma", "sd3"])
def test_unet_loader_holds_int8_and_equals_comfy_kitchens_dequantisation(env, family):
    """"flux-diffusers-keys": a FLUX file in diffusers' names, which the whole build brings to BFL's and back
    (it lost every scale until this test; fused rows of int8 and float32 parts come back float32, so
    those layers are dequantised once at load, rotation included)."""
    rec = Called()
    (int8,) = call(split_loaders.unet_loader, env, rec, unet_name=f"{family}-int8.safetensors")
    (plain,) = call(split_loaders.unet_loader, env, unet_name=f"{family}-dequant.safetensors")
    with int8.unet() as a, plain.unet() as b:
        layers = _compare(a, b)
        rotated = [m for m in layers if rotation_group(m) == GROUP]
        assert rotated  # rotated layers reached the model (plain int8 ones too, in most families)
        if family.startswith("flux") and family != "flux2":
            fused = [m for m in layers if weight_scale(m).unique().numel() > 1 and m.weight.shape[0] < 3 * 64]
            assert fused  # per-row scales split with the fused qkv / linear1 rows
            out_a, out_b = tiny_flux.forward(a), tiny_flux.forward(b)
            assert float((out_a - out_b).abs().max()) < 1e-4
    assert "int8 weights kept int8 and cast per layer" in rec.messages[0]
    print(f"{family}: {len(layers)} int8 layers, {len(rotated)} rotated")


def test_an_int8_t5_through_clip_loader_equals_the_dequantised_file(env):
    """T5 keeps ``wo`` in float32 (it casts its activations to that weight's dtype first): an int8 ``wo``
    is dequantised once at load; the other int8 layers stay int8."""
    from nodes.text import clip_text_encode

    (s,) = call(split_loaders.clip_loader, env, clip_name="t5-int8.safetensors", type="chroma")
    (p,) = call(split_loaders.clip_loader, env, clip_name="t5-dequant.safetensors", type="chroma")
    with s.encoder("text_encoder") as a, p.encoder("text_encoder") as b:
        wo = {n: m for n, m in a.named_modules() if n.endswith("DenseReluDense.wo")}
        assert wo and all(m.weight.dtype == torch.float32 for m in wo.values())
        _compare(a, b)
    (cs,) = call(clip_text_encode, env, text="a lighthouse", clip=s)
    (cp,) = call(clip_text_encode, env, text="a lighthouse", clip=p)
    assert float((cs[0][0] - cp[0][0]).abs().max()) < 1e-4


def _flux_graph(unet: str) -> dict:
    from flow_family_files import txt2img_graph

    loader = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
              "8": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                               "clip_name2": "t5-int8.safetensors", "type": "flux"}},
              "9": {"class_type": "VAELoader", "inputs": {"vae_name": "flux-ae.safetensors"}},
              "_model": ["1", 0], "_clip": ["8", 0], "_vae": ["9", 0]}
    return txt2img_graph(loader, prompt="a red boat", negative="", size=32, seed=5, steps=3, cfg=1.0,
                         scheduler="simple", prefix="int8")


def test_sampling_an_int8_file_equals_sampling_the_dequantised_one(env):
    registry = default_registry()
    images = []
    for unet in ("flux-int8.safetensors", "flux-dequant.safetensors"):
        outcome = Executor(registry, env).run(parse(_flux_graph(unet)))
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        images.append(outcome.results["6"][0].numpy())
    diff = float(np.abs(images[0] - images[1]).max())
    print(f"int8 vs dequantised: max pixel difference {diff * 255:.4f}/255")
    assert diff <= 1 / 255 and images[0].std() > 0.005


@pytest.mark.parametrize("dora", [False, True])
def test_a_lora_on_an_int8_model_equals_it_on_the_dequantised_one(env, root, dora):
    """The LoRA runs beside the int8 weight, on the unrotated input; a DoRA needs the weight itself, which
    the int8 layer rebuilds per call (scale applied, columns rotated back)."""
    from lora_support import flux_lora_beside_stored_vs_dequantised

    (model,) = call(split_loaders.unet_loader, env, unet_name="flux-int8.safetensors")
    with model.unet() as net:
        assert rotation_group(net.transformer_blocks[0].ff.net[0].proj) == GROUP  # the DoRA's layer is rotated
    lora_name = f"int8-test-{'dora' if dora else 'lora'}.safetensors"
    diff, effect = flux_lora_beside_stored_vs_dequantised(
        env, root, ("flux-int8.safetensors", "flux-dequant.safetensors"), lora_name,
        ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.img_attn.proj",
         "double_blocks.0.img_mlp.0"), dora="double_blocks.0.img_mlp.0" if dora else None)
    print(f"{lora_name} on int8 vs dequantised: {diff:.2e} (the LoRA moves the output by {effect:.2e})")
    assert diff <= 1e-4 and effect > 1e-2


def test_an_int8_model_built_straight_into_disk_blocks_equals_the_whole_load(root):
    """The rotation group travels with the scale: the meta module built into disk blocks gets both."""
    from nodes.checkpoint.split import load_unet_file
    from nodes.runtime import offload

    path = root / "diffusion_models" / "flux-int8.safetensors"
    whole = load_unet_file(path, torch.float32).modules["unet"]
    straight = load_unet_file(path, torch.float32, offload=lambda n, b: offload.Plan(
        onload="cpu", rest="disk", note="test")).modules["unet"]
    assert offload.offloaded(straight).paged
    assert sum(rotation_group(m) == GROUP for m in straight.modules()) == \
        sum(rotation_group(m) == GROUP for m in whole.modules()) > 0
    assert torch.equal(tiny_flux.forward(straight), tiny_flux.forward(whole))


@pytest.mark.parametrize("change,words", [
    (lambda s, k: s.update({k + ".comfy_quant": _marker({"format": "int8_tensorwise", "convrot": True,
                                                          "convrot_groupsize": 8})}), "groups of 8"),
    (lambda s, k: s.update({k + ".comfy_quant": _marker({"format": "int8_tensorwise", "convrot": True,
                                                          "convrot_groupsize": 256})}), "do not divide"),
    (lambda s, k: s.update({k + ".comfy_quant": _marker({"format": "float8_e4m3fn"})}), "stored as int8"),
    (lambda s, k: s.update({k + ".comfy_quant": _marker({"convrot": True})}), "None"),
])
def test_an_int8_file_the_facts_do_not_cover_is_an_error_naming_file_and_key(env, root, change, words):
    state, _ = quantise_int8(tiny_flux.bfl_transformer("dev"))
    layer = next(k[: -len(".weight")] for k, v in sorted(state.items()) if v.dtype == torch.int8 and v.shape[1] == 64)
    change(state, layer)
    name = f"bad-int8-{abs(hash(words)) % 1000}.safetensors"
    tiny_flux._save(root / "diffusion_models" / name, state)
    with pytest.raises(Exception) as caught:
        call(split_loaders.unet_loader, env, unet_name=name)
    assert name in str(caught.value) and layer in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize("template", ["image_z_image_turbo_int8.json", "image_z_image_int8.json"])
def test_comfyuis_z_image_int8_templates_run_and_equal_the_dequantised_files(env, root, template):
    """ComfyUI's Z-Image int8 templates (z_image*_int8_convrot.safetensors) on the tiny int8 transformer and
    Qwen3, against the same graph on comfy-kitchen's dequantisation of both."""
    import importlib

    from engine.formats import parse_document

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    document = json.loads((folder / template).read_text(encoding="utf-8"))
    registry = default_registry()
    images = []
    for kind in ("int8", "dequant"):
        wf = parse_document(document, registry)
        (unet,) = [n for n in wf.nodes.values() if n.type == "UNETLoader"]
        (clip,) = [n for n in wf.nodes.values() if n.type == "CLIPLoader"]
        (vae,) = [n for n in wf.nodes.values() if n.type == "VAELoader"]
        (latent,) = [n for n in wf.nodes.values() if n.type == "EmptySD3LatentImage"]
        (decode,) = [n for n in wf.nodes.values() if n.type == "VAEDecode"]
        assert unet.inputs["unet_name"].endswith("int8_convrot.safetensors") and clip.inputs["type"] == "lumina2"
        unet.inputs["unet_name"], clip.inputs["clip_name"] = f"z_image-{kind}.safetensors", f"qwen3-{kind}.safetensors"
        vae.inputs["vae_name"] = "flux-ae.safetensors"
        latent.inputs.update(width=32, height=32)
        for sampler in (n for n in wf.nodes.values() if n.type == "KSampler"):
            sampler.inputs["steps"] = min(int(sampler.inputs["steps"]), 4)
        outcome = Executor(registry, env).run(wf)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        images.append(outcome.results[decode.id][0].numpy())
    diff = float(np.abs(images[0] - images[1]).max())
    print(f"{template}: int8 vs dequantised {diff * 255:.4f}/255")
    assert diff <= 1 / 255 and images[0].std() > 0.005
