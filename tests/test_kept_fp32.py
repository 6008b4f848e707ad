"""The modules diffusers keeps in float32 (``_keep_in_fp32_modules``) stay float32 in Kiln's loads
(nodes.checkpoint.kept_fp32), and JoyImage's diffusers folder loads as its split files do.

For JoyImage (its time embedder) and Krea 2 (its norm scales) a bf16 load of ComfyUI's file through
Kiln's UNETLoader path holds every tensor as diffusers' own ``from_pretrained(torch_dtype=bfloat16)``
of the same weights saved as a diffusers folder: the kept ones float32 and equal to the file's float32
values bit for bit, the rest bf16; the transformers' bf16 outputs agree. Not vacuous: without the rule
the kept tensors are bf16 copies and the outputs move.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_joyimage
import tiny_krea2
from flow_family_files import env, models_root, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint import kept_fp32
from nodes.families import joyimage, krea2
from nodes.joyimage_nodes import text_encode_joyimage_edit
from nodes.sampling import ksampler

FOLDER = "tiny-joyimage-diffusers"
#: family -> (tiny module, family, ComfyUI's file state, text width of the conditioning)
FAMILIES = {"joyimage": (tiny_joyimage, joyimage.FAMILY, tiny_joyimage.transformer_state, tiny_joyimage.TEXT),
            "krea2": (tiny_krea2, krea2.FAMILY, tiny_krea2.original_state, 12 * tiny_krea2.TEXT)}


def _make(root):
    """JoyImage's split files and diffusers folder; per family, ComfyUI's prefixed transformer file and
    the transformer as diffusers saves it (``<family>-transformer/``); JoyImage's transformer in bf16."""
    tiny_joyimage.make_models_folder(root)
    tiny_joyimage.save_pipeline_folder(root / "checkpoints" / FOLDER)
    for name, (tiny, _, file_state, _) in FAMILIES.items():
        save_state(root / "diffusion_models" / f"{name}-comfy.safetensors",
                   {"model.diffusion_model." + k: v for k, v in file_state().items()})
        tiny.components()["transformer"].save_pretrained(str(root / f"{name}-transformer"), safe_serialization=True)
    save_state(root / "diffusion_models" / "joyimage-bf16.safetensors",
               {k: v.bfloat16() for k, v in tiny_joyimage.transformer_state().items()})
    return root


root = models_root(_make, "kept-fp32")


def _output(family, net, width):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, width, generator=g)
    with torch.no_grad():
        (out,) = family.wrap_network(net)(x, torch.tensor(600.0), text)
    return out


def test_the_rule_is_diffusers_by_whole_name_parts():
    kept = ("time_embedder", "norm1")
    assert kept_fp32.is_kept("condition_embedder.time_embedder.linear_1.bias", kept)
    assert kept_fp32.is_kept("transformer_blocks.3.norm1.weight", kept)
    assert not kept_fp32.is_kept("double_blocks.0.img_norm1.weight", kept)  # a part, not a substring
    assert kept_fp32.kept_modules(tiny_joyimage.components()["transformer"]) == (
        "time_embedder", "norm1", "norm2", "norm_out")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # the rounded twin's norms
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_bf16_load_holds_the_kept_modules_as_diffusers_bf16_load_does(root, name, monkeypatch):
    from nodes.checkpoint.split import load_unet_file

    tiny, family, _, width = FAMILIES[name]
    cls = type(tiny.components()["transformer"])
    want = tiny.components()["transformer"].state_dict()  # the files' float32 values
    kept = [k for k in want if kept_fp32.is_kept(k, cls._keep_in_fp32_modules)]
    assert len(kept) >= 4 and all(want[k].dtype == torch.float32 for k in kept)
    ours = load_unet_file(root / "diffusion_models" / f"{name}-comfy.safetensors", torch.bfloat16).modules["unet"]
    theirs = cls.from_pretrained(str(root / f"{name}-transformer"), torch_dtype=torch.bfloat16).eval()
    got, ref = ours.state_dict(), theirs.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in kept)
    assert set(got) == set(ref) and all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in ref)
    assert sum(v.dtype == torch.bfloat16 for v in got.values()) > len(got) // 2
    a, b = _output(family, ours, width), _output(family, theirs, width)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0)
    # not vacuous: without the rule the kept tensors are bf16 copies and the output moves
    monkeypatch.setattr(kept_fp32, "keep_in_fp32", lambda model, state, names=None: model)
    rounded = load_unet_file(root / "diffusion_models" / f"{name}-comfy.safetensors", torch.bfloat16).modules["unet"]
    plain = rounded.state_dict()
    assert all(plain[k].dtype == torch.bfloat16 for k in kept) and any(
        not torch.equal(plain[k].float(), want[k]) for k in kept)
    gap = float((_output(family, rounded, width).float() - a.float()).abs().max())
    print(f"{name}: output moved {gap:.4f} without the rule")
    assert gap > 1e-3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_bf16_file_built_straight_into_disk_blocks_asks_the_size_it_holds(root, name):
    """The kept tensors are float32 in the paged build too (the rule run per block: each family's
    layout's ``after``) and the size asked before building counts them so: the whole build's bytes."""
    from nodes.checkpoint.split import load_unet_file
    from nodes.runtime import offload
    from nodes.runtime.measure import module_bytes

    path = root / "diffusion_models" / f"{name}-comfy.safetensors"
    whole = load_unet_file(path, torch.bfloat16).modules["unet"]
    plan, asked = offload.Plan(onload="cpu", rest="disk", note="test: paged"), []
    paged = load_unet_file(path, torch.bfloat16, offload=lambda n, b: asked.append(n) or plan).modules["unet"]
    assert offload.offloaded(paged).paged and asked == [module_bytes(whole)]
    dtypes = {n: p.dtype for n, p in paged.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in whole.named_parameters()}
    kept = [n for n in dtypes if kept_fp32.is_kept(n, type(whole)._keep_in_fp32_modules)]
    assert len(kept) >= 4 and all(dtypes[n] == torch.float32 for n in kept)


def test_a_scaled_fp8_file_whose_time_embedder_is_fp8_runs(root):
    """A scaled fp8 JoyImage file with the time embedder's linears in fp8: the kept module is held in
    float32 (the file's values times their scales), so the forward runs (the class casts the timestep to
    its time embedder's dtype: in fp8, CPU kernels refuse it) and equals the dequantised twin's."""
    from test_scaled_fp8 import quantise

    from nodes.checkpoint.flow_transformers import _as_stored
    from nodes.checkpoint.joyimage_load import build_transformer

    scaled, twin = quantise(tiny_joyimage.transformer_state())
    assert scaled["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float8_e4m3fn
    a, b = (build_transformer(_as_stored(s, ""), "tiny", torch.float32) for s in (scaled, twin))
    assert a.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert a.double_blocks[0].attn.img_attn_qkv.weight.dtype == torch.float8_e4m3fn  # the rest as stored
    width = tiny_joyimage.TEXT
    assert (_output(joyimage.FAMILY, a, width) - _output(joyimage.FAMILY, b, width)).abs().max() <= 1e-5


def test_a_bf16_file_computed_in_float32_holds_the_kept_linears_whole(root):
    """Kiln holds a bf16 file's linear weights bf16 in a float32 model (cast per call); the kept modules'
    linears it holds in float32 as diffusers does (the file's values widened), and the size a build
    straight into disk blocks asks counts them so."""
    from nodes.checkpoint.load import open_state
    from nodes.checkpoint.split import load_unet_file
    from nodes.checkpoint.tensors import dtypes_of, shapes_of
    from nodes.runtime import fp8
    from nodes.runtime.measure import module_bytes

    path = root / "diffusion_models" / "joyimage-bf16.safetensors"
    net = load_unet_file(path, torch.float32).modules["unet"]
    embedder = net.condition_embedder.time_embedder
    assert type(embedder.linear_1) is torch.nn.Linear and embedder.linear_1.weight.dtype == torch.float32
    want = tiny_joyimage.components()["transformer"].condition_embedder.time_embedder.linear_1.weight
    assert torch.equal(embedder.linear_1.weight, want.bfloat16().float())
    assert net.condition_embedder.time_proj.weight.dtype == torch.bfloat16  # not kept: held as stored
    assert fp8.kept_as_stored(net) == "bf16"
    state = open_state(path)  # the size a build straight into disk blocks asks, from the header alone
    asked = fp8.held_bytes(shapes_of(state), dtypes_of(state), torch.float32, fp8.linear_weights_of(net))
    assert asked == module_bytes(net)


# -- JoyImage's diffusers folder -------------------------------------------------------------------------


def _edit(env, model, clip, vae) -> np.ndarray:
    """ComfyUI's template graph on one picture: TextEncodeJoyImageEdit (prompt, empty negative; picture
    and VAE on both), KSampler euler/normal cfg 4, VAEDecode."""
    picture = tiny_joyimage.picture(0, 120, 72)
    image = {"images.image0": torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]}
    (pos,) = call(text_encode_joyimage_edit, env, clip=clip, prompt="turn the sky purple", vae=vae, **image)
    (neg,) = call(text_encode_joyimage_edit, env, clip=clip, prompt="", vae=vae, **image)
    h, w = joyimage.bucket(picture.size[1], picture.size[0])
    (out,) = call(ksampler, env, model=model, seed=5, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal",
                  positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 16, h // 8, w // 8)})
    return vae.decode(out["samples"]).numpy()


def test_a_diffusers_folder_through_checkpoint_loader_equals_the_split_files(env, monkeypatch):
    """JoyImageEditPipeline.save_pretrained's folder (CheckpointLoaderSimple) gives the edit the split files
    (UNETLoader, CLIPLoader type joyimage, VAELoader) give, and holds the same transformer, bit for bit."""
    tiny_joyimage.small_buckets(monkeypatch)
    model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=FOLDER)
    assert model.family is joyimage.FAMILY and model.scheduler_config["shift"] == 1.5
    (unet,) = call(split_loaders.unet_loader, env, unet_name="tiny-joyimage.safetensors", weight_dtype="default")
    (split_clip,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl_8b_joyimage.safetensors",
                         type="joyimage")
    (split_vae,) = call(loaders.vae_loader, env, vae_name="tiny-wan_2.1_vae.safetensors")
    with model._use_unet() as a, unet._use_unet() as b:
        got, want = a.state_dict(), b.state_dict()
    assert set(got) == set(want) and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
                                         for k in want)
    ours, split = _edit(env, model, clip, vae), _edit(env, unet, split_clip, split_vae)
    print(f"folder vs split files {np.abs(ours - split).max() * 255:.6f}/255")
    assert ours.shape == (1, 64, 96, 3) and np.abs(ours - split).max() <= 1e-6


def test_a_bf16_folder_holds_the_time_embedder_in_float32_from_its_files(root):
    """Built whole, and straight into disk blocks (the rule run per block): the same tensors, the same output."""
    from nodes.checkpoint.load import load_checkpoint
    from nodes.runtime import offload
    from nodes.runtime.measure import module_bytes

    folder = root / "checkpoints" / FOLDER
    whole = load_checkpoint(folder, torch.bfloat16).modules["unet"]
    got = whole.state_dict()
    want = tiny_joyimage.components()["transformer"].state_dict()
    kept = [k for k in want if ".time_embedder." in k]
    assert len(kept) == 4 and all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in kept)
    assert got["img_in.weight"].dtype == torch.bfloat16
    plan, asked = offload.Plan(onload="cpu", rest="disk", note="test: paged"), []
    paged = load_checkpoint(folder, torch.bfloat16, offload=lambda n, b: asked.append(n) or plan).modules["unet"]
    assert offload.offloaded(paged).paged and asked == [module_bytes(whole)]  # the kept tensors counted float32
    assert {n: p.dtype for n, p in paged.named_parameters()} == {n: p.dtype for n, p in whole.named_parameters()}
    # JoyImageNetwork runs the layers outside the blocks itself (not through the module's hooked forward):
    # it brings them in from their file for the call (nodes.runtime.offload.outside_blocks)
    assert torch.equal(_output(joyimage.FAMILY, paged, tiny_joyimage.TEXT),
                       _output(joyimage.FAMILY, whole, tiny_joyimage.TEXT))
    with offload.outside_blocks(paged):
        top = {k: v for k, v in paged.state_dict().items() if not k.startswith("double_blocks.")}
        assert all(v.dtype == got[k].dtype and torch.equal(v, got[k]) for k, v in top.items())
