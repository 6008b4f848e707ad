"""UNETLoader, CLIPLoader and DualCLIPLoader on the files people have, against the checkpoint.

The same tiny weights are written as separate files in each layout users meet
(original UNet keys with and without ``model.diffusion_model.``, diffusers' UNet
layout, transformers 4 and 5 text-encoder keys, OpenCLIP's layout) and must load
to exactly the modules CheckpointLoader builds from the single file; a split SDXL
samples to the same latent as the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from engine.context import NodeError
from node_call import Called, call
from nodes import loaders, sampling, split_loaders, text
from nodes.checkpoint.to_original import open_clip_to_original, unet_to_original


def _save(path: Path, state: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.name


def _te_keys(te, transformers4: bool) -> dict:
    state = te.state_dict()
    if transformers4:  # transformers 4 wrote every key under text_model.
        state = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                 for k, v in state.items()}
    return state


@pytest.fixture(scope="module")
def split_files(tiny_models_dir):
    root = Path(tiny_models_dir)
    sd1, sd2, xl = tm.components("sd1"), tm.components("sd2"), tm.components("sdxl")
    unet = sd1["unet"]
    original = unet_to_original(unet.state_dict(), dict(unet.config))
    _save(root / "diffusion_models" / "sd1-original.safetensors", original)
    _save(root / "unet" / "sd1-bare.safetensors", {k[len("model.diffusion_model."):]: v for k, v in original.items()})
    _save(root / "diffusion_models" / "sd1-diffusers.safetensors", unet.state_dict())
    _save(root / "text_encoders" / "clip_l.safetensors", _te_keys(sd1["text_encoder"], transformers4=False))
    _save(root / "clip" / "clip_l-t4.safetensors", _te_keys(sd1["text_encoder"], transformers4=True))
    # SD 2.x's encoder as OpenCLIP writes it: all 24 (here 3) blocks, the last one unused
    extra = {k.split(".", 3)[3]: torch.randn(v.shape) * 0.02 for k, v in sd2["text_encoder"].state_dict().items()
             if k.startswith("encoder.layers.0.")}
    _save(root / "text_encoders" / "open_clip_h.safetensors",
          open_clip_to_original(sd2["text_encoder"].state_dict(), "", extra_layers=[extra],
                                projection=torch.randn(64, 64) * 0.02))
    xl_unet = xl["unet"]
    _save(root / "diffusion_models" / "sdxl-unet.safetensors", unet_to_original(xl_unet.state_dict(), dict(xl_unet.config)))
    _save(root / "text_encoders" / "clip_g.safetensors", _te_keys(xl["text_encoder_2"], transformers4=False))
    _save(root / "text_encoders" / "clip_l_xl.safetensors", _te_keys(xl["text_encoder"], transformers4=True))
    broken = dict(original)
    for k in [k for k in broken if ".output_blocks.2." in k]:
        del broken[k]
    _save(root / "diffusion_models" / "sd1-broken.safetensors", broken)
    cut = {k: v for k, v in _te_keys(sd1["text_encoder"], False).items() if "layers.1.mlp." not in k}
    _save(root / "text_encoders" / "clip_l-cut.safetensors", cut)
    return root


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["sd1-original.safetensors", "sd1-bare.safetensors", "sd1-diffusers.safetensors"])
def test_unet_loader_reads_every_layout(tiny_env, split_files, name):
    rec = Called()
    model = call(split_loaders.unet_loader, tiny_env, rec, unet_name=name)[0]
    reference = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))[0]
    assert model.family.name == "sd1" and "sd1 UNet" in rec.messages[0]
    assert model.scheduler_config == reference.scheduler_config
    with model.unet() as a, reference.unet() as b:
        _same_weights(a, b)


@pytest.mark.parametrize("name", ["clip_l.safetensors", "clip_l-t4.safetensors"])
def test_clip_loader_transformers_4_and_5_keys_encode_like_the_checkpoint(tiny_env, split_files, name):
    clip = call(split_loaders.clip_loader, tiny_env, clip_name=name, type="stable_diffusion")[0]
    reference = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd1"))[1]
    a = call(text.clip_text_encode, tiny_env, text="a red house", clip=clip)[0][0][0]
    b = call(text.clip_text_encode, tiny_env, text="a red house", clip=reference)[0][0][0]
    assert clip.family.name == "sd1" and torch.equal(a, b)


def test_clip_loader_tells_sd2_by_the_openclip_layout(tiny_env, split_files):
    clip = call(split_loaders.clip_loader, tiny_env, clip_name="open_clip_h.safetensors", type="stable_diffusion")[0]
    reference = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sd2"))[1]
    assert clip.family.name == "sd2"
    a = call(text.clip_text_encode, tiny_env, text="a red house", clip=clip)[0][0][0]
    b = call(text.clip_text_encode, tiny_env, text="a red house", clip=reference)[0][0][0]
    assert torch.equal(a, b)


def test_split_sdxl_samples_like_the_checkpoint(tiny_env, split_files):
    model = call(split_loaders.unet_loader, tiny_env, unet_name="sdxl-unet.safetensors")[0]
    clip = call(split_loaders.dual_clip_loader, tiny_env, clip_name1="clip_g.safetensors",
                clip_name2="clip_l_xl.safetensors", type="sdxl")[0]  # either order
    ref_model, ref_clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name("sdxl"))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def sample(m, c):
        pos = call(text.clip_text_encode, tiny_env, text="a castle", clip=c)[0]
        neg = call(text.clip_text_encode, tiny_env, text="fog", clip=c)[0]
        return call(sampling.ksampler, tiny_env, model=m, seed=3, steps=3, cfg=5.0, sampler_name="euler",
                    scheduler="normal", positive=pos, negative=neg, latent_image=latent)[0]["samples"]

    out = sample(model, clip)
    assert model.family.name == clip.family.name == "sdxl"
    assert torch.equal(out, sample(ref_model, ref_clip)) and out.abs().sum() > 0


def test_wrong_files_are_named_errors(tiny_env, split_files):
    with pytest.raises(NodeError) as err:  # a text encoder where a UNet belongs
        (split_files / "diffusion_models" / "clip_as_unet.safetensors").write_bytes(
            (split_files / "text_encoders" / "clip_l.safetensors").read_bytes())
        call(split_loaders.unet_loader, tiny_env, unet_name="clip_as_unet.safetensors")
    assert err.value.input_name == "unet_name" and "CLIPLoader" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, tiny_env, unet_name="sd1-broken.safetensors")
    assert "sd1" in str(err.value) and ("missing" in str(err.value) or "incomplete" in str(err.value))
    with pytest.raises(NodeError) as err:  # a partial encoder is refused, never loaded silently
        call(split_loaders.clip_loader, tiny_env, clip_name="clip_l-cut.safetensors", type="stable_diffusion")
    assert err.value.input_name == "clip_name" and "missing" in str(err.value)
    with pytest.raises(NodeError) as err:  # two CLIP-L files are not an SDXL pair
        call(split_loaders.dual_clip_loader, tiny_env, clip_name1="clip_l.safetensors",
             clip_name2="clip_l-t4.safetensors", type="sdxl")
    assert "sdxl" in str(err.value)


def test_a_checkpoint_missing_part_of_its_unet_names_it(tiny_env, tmp_path):
    from safetensors.torch import load_file

    src = Path(tiny_env.paths.models.root) / "checkpoints" / tm.checkpoint_name("sd1")
    state = {k: v for k, v in load_file(str(src)).items() if "output_blocks.1." not in k}
    _save(Path(tiny_env.paths.models.root) / "checkpoints" / "cut-unet.safetensors", state)
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, tiny_env, ckpt_name="cut-unet.safetensors")
    assert err.value.input_name == "ckpt_name" and "missing" in str(err.value) and "up_blocks.0.resnets.1" in str(err.value)
