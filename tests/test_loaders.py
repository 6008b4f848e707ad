"""Checkpoint and VAE loading: real files through the real loader nodes, compared with the source models.

Tiny models are written in the original single-file layout by Kiln's own
converter and read back with diffusers' converters (independent code), and as
diffusers folders. Full-size architectures are checked on the meta device
(shapes only, no memory): detection must give the released configs.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import tiny_models as tm
from engine.cache import value_nbytes
from engine.context import Environment, NodeError, Paths
from nodes.runtime.models import ModelManager
from node_call import Called, call
from nodes import loaders
from nodes.families import sd1, sd2, sdxl

import torch  # noqa: E402

FORMATS = ("single", "diffusers")


def _same_weights(a, b) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]


def _unet_inputs(unet, family: str):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if family == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return x, torch.tensor([500.0, 20.0]), ctx, kw


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", tm.VARIANTS)
def test_loads_identical_model(tiny_env, variant, fmt):
    rec = Called()
    model, clip, vae = call(loaders.checkpoint_loader, tiny_env, rec, ckpt_name=tm.checkpoint_name(variant, fmt))
    src = tm.components(variant)
    family = "sd2" if variant.startswith("sd2") else variant
    assert model.family.name == clip.family.name == family
    assert model.prediction_type == ("v_prediction" if variant == "sd2-v" else "epsilon")
    assert model.latent.scale == vae.latent_scale == src["vae"].config.scaling_factor
    assert rec.messages and family in rec.messages[0]
    with model.unet() as unet:
        assert _same_weights(unet, src["unet"]) == []
        x, t, ctx, kw = _unet_inputs(unet, family)
        with torch.no_grad():  # same weights AND same architecture (head counts, depth): same output
            assert torch.equal(unet(x, t, ctx, **kw).sample, src["unet"](x, t, ctx, **kw).sample)
    for name in ("text_encoder", "text_encoder_2"):
        if name in src:
            with clip._use(name) as te:
                assert type(te) is type(src[name])
                assert _same_weights(te, src[name]) == []
                assert te.config.num_attention_heads == src[name].config.num_attention_heads
                assert te.config.hidden_act == src[name].config.hidden_act
    with vae._use_vae() as v:
        assert _same_weights(v, src["vae"]) == []
    # Handles are light: the output cache never holds a second copy of the weights.
    assert value_nbytes((model, clip, vae)) == 0


def test_scheduler_config_matches_source(tiny_env):
    for variant in tm.VARIANTS:
        src = dict(tm.components(variant)["scheduler"].config)
        for fmt in FORMATS:
            model = call(loaders.checkpoint_loader, tiny_env, ckpt_name=tm.checkpoint_name(variant, fmt))[0]
            for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type",
                        "steps_offset", "timestep_spacing"):
                assert model.scheduler_config[key] == src[key], (variant, fmt, key)


def test_full_size_architectures_detected_from_shapes():
    """Released SD 1.5, SD 2.x and SDXL base shapes give their published configs (meta tensors, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nodes.checkpoint import detect
    from nodes.checkpoint.to_original import (open_clip_to_original, openai_clip_to_original, unet_to_original,
                                              vae_to_original)

    unet_common = dict(layers_per_block=2, norm_num_groups=32)
    sd_unet = dict(unet_common, block_out_channels=(320, 640, 1280, 1280),
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    archs = {
        "sd1": dict(sd_unet, cross_attention_dim=768, attention_head_dim=8),
        "sd2": dict(sd_unet, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "sdxl": dict(unet_common, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
    }
    vae_cfg = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768)
    with init_empty_weights():
        vae = AutoencoderKL(**vae_cfg)
        vae_sd = vae_to_original(vae.state_dict(), dict(vae.config))
        te_l = CLIPTextModel(CLIPTextConfig(**clip_l)).state_dict()
        te_h = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16)).state_dict()
        te_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                          num_hidden_layers=32, num_attention_heads=20,
                                                          projection_dim=1280)).state_dict()
        for family, cfg in archs.items():
            unet = UNet2DConditionModel(**cfg)
            sd = {**unet_to_original(unet.state_dict(), dict(unet.config)), **vae_sd}
            if family == "sd1":
                sd.update(openai_clip_to_original(te_l, sd1.TEXT_PREFIX))
            elif family == "sd2":
                sd.update(open_clip_to_original(te_h, sd2.TEXT_PREFIX, projection=torch.empty(1024, 1024, device="meta")))
            else:
                sd.update(openai_clip_to_original(te_l, sdxl.TEXT1_PREFIX))
                sd.update(open_clip_to_original(te_g, sdxl.TEXT2_PREFIX))
            found = detect.detect({k: tuple(v.shape) for k, v in sd.items()})
            assert found.family.name == family
            for key, value in cfg.items():
                got = found.unet[key]
                assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, (family, key)
            for key, value in vae_cfg.items():
                assert tuple(found.vae[key]) == value if isinstance(value, tuple) else found.vae[key] == value
            texts = found.text
            expect = {"sd1": {"text_encoder": (768, 12, 12, 3072)},
                      "sd2": {"text_encoder": (1024, 23, 16, 4096)},  # SD 2 conditions on the penultimate layer
                      "sdxl": {"text_encoder": (768, 12, 12, 3072), "text_encoder_2": (1280, 32, 20, 5120)}}[family]
            for name, (width, layers, heads, inner) in expect.items():
                t = texts[name]
                assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["intermediate_size"]) \
                    == (width, layers, heads, inner), (family, name)
            assert texts["text_encoder"]["hidden_act"] == ("gelu" if family == "sd2" else "quick_gelu")


def test_half_precision_file_is_upcast_on_cpu(tiny_env, tmp_path):
    tm.save_single_file("sd1", Path(tiny_env.paths.models.root) / "checkpoints" / "half-sd1.safetensors", half=True)
    model, clip, vae = call(loaders.checkpoint_loader, tiny_env, ckpt_name="half-sd1.safetensors")
    src = tm.components("sd1")["unet"].state_dict()
    with model.unet() as unet:
        got = unet.state_dict()
        assert all(v.dtype == torch.float32 for v in got.values())
        assert all(torch.equal(got[k], src[k].half().float()) for k in src)


def test_safe_pickle_loads_and_unsafe_pickle_is_refused(tiny_env):
    from safetensors.torch import load_file

    folder = Path(tiny_env.paths.models.root) / "checkpoints"
    state = load_file(str(folder / "tiny-sd1.safetensors"))
    torch.save(state, folder / "plain.ckpt")
    model = call(loaders.checkpoint_loader, tiny_env, ckpt_name="plain.ckpt")[0]
    with model.unet() as unet:
        assert _same_weights(unet, tm.components("sd1")["unet"]) == []

    torch.save({"state_dict": state, "callback": _NotAllowed()}, folder / "unsafe.ckpt")
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, tiny_env, ckpt_name="unsafe.ckpt")
    assert err.value.input_name == "ckpt_name"
    assert "pickle" in str(err.value) and "safetensors" in str(err.value)


class _NotAllowed:
    """An object that only an unrestricted unpickler (running code) can rebuild."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("name, content, expect", [
    ("truncated.safetensors", "truncate", "truncated or corrupt"),
    ("garbage.safetensors", b"this is not a model at all", "truncated or corrupt"),
    ("garbage.ckpt", b"PK\x03\x04 broken zip", "truncated or corrupt"),
    ("vae-only.safetensors", "vae", "only a VAE"),
    ("unknown.safetensors", "unknown", "no Stable Diffusion UNet"),
])
def test_bad_files_get_clear_errors(tiny_env, name, content, expect):
    from safetensors.torch import save_file

    folder = Path(tiny_env.paths.models.root) / "checkpoints"
    path = folder / name
    if content == "truncate":
        data = (folder / "tiny-sd1.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "vae":
        tm.save_vae("sd1", path)
    elif content == "unknown":
        save_file({"some.weight": torch.zeros(3)}, str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, tiny_env, ckpt_name=name)
    assert err.value.input_name == "ckpt_name"
    assert expect in str(err.value) and name in str(err.value)


def test_missing_file_and_escape_are_refused(tiny_env):
    validate = loaders.checkpoint_loader.validate
    assert validate(tiny_env, {"ckpt_name": "tiny-sd1.safetensors"}) == []
    problems = validate(tiny_env, {"ckpt_name": "nope.safetensors"})
    assert problems and problems[0][0] == "ckpt_name" and "nope.safetensors" in problems[0][1]
    assert validate(tiny_env, {"ckpt_name": "../vae/tiny-vae.safetensors"})[0][0] == "ckpt_name"
    with pytest.raises(NodeError, match="no model named"):
        call(loaders.checkpoint_loader, tiny_env, ckpt_name="nope.safetensors")
    assert loaders.vae_loader.validate(tiny_env, {"vae_name": "nope.safetensors"})[0][0] == "vae_name"


def test_choices_list_files_and_diffusers_folders(tiny_env):
    names = loaders.checkpoint_loader.input("ckpt_name").choice_list(tiny_env)
    for variant in tm.VARIANTS:
        assert tm.checkpoint_name(variant) in names and tm.checkpoint_name(variant, "diffusers") in names
    assert not any("/" in n for n in names)  # no files from inside diffusers folders
    assert loaders.vae_loader.input("vae_name").choice_list(tiny_env) == ["tiny-vae.safetensors", "pixel_space"]
    schema = loaders.checkpoint_loader.schema(tiny_env)
    assert schema["aliases"] == ["CheckpointLoaderSimple"]


def test_vae_loader_loads_standalone_vae(tiny_env):
    vae = call(loaders.vae_loader, tiny_env, vae_name="tiny-vae.safetensors")[0]
    with vae._use_vae() as v:
        assert _same_weights(v, tm.components("sd1")["vae"]) == []
    assert value_nbytes(vae) == 0


def test_prediction_override_shares_the_loaded_model(tiny_env):
    a = call(loaders.checkpoint_loader, tiny_env, ckpt_name="tiny-sd2.safetensors")[0]
    b = call(loaders.checkpoint_loader, tiny_env, ckpt_name="tiny-sd2.safetensors", prediction="v_prediction")[0]
    assert (a.prediction_type, b.prediction_type) == ("epsilon", "v_prediction")
    assert tiny_env.models.stats()["loaded"] == 1


def test_one_copy_for_two_loaders_and_unload_frees(tiny_env):
    manager = tiny_env.models
    m1, c1, v1 = call(loaders.checkpoint_loader, tiny_env, ckpt_name="tiny-sd1.safetensors")
    m2, c2, v2 = call(loaders.checkpoint_loader, tiny_env, ckpt_name="tiny-sd1.safetensors")
    with m1.unet() as u1, m2.unet() as u2:
        assert u1 is u2
        assert manager.stats()["entries"][0]["in_use"] == ["unet"]
    stats = manager.stats()
    assert stats["loaded"] == 1 and stats["loads"] == 1 and stats["hits"] >= 1
    src = tm.components("sd1")
    assert stats["bytes"] == sum(t.numel() * t.element_size() for name in ("unet", "vae", "text_encoder")
                                 for t in [*src[name].parameters(), *src[name].buffers()])
    assert manager.unload_all() == 1
    assert manager.stats()["loaded"] == 0 and manager.stats()["bytes"] == 0
    # A handle kept in the output cache still works: the manager reloads on demand.
    with m1.unet() as u3:
        assert u3 is not u1 and _same_weights(u3, u1) == []
    assert manager.stats()["loads"] == 2


def test_touched_file_is_a_new_model(tiny_env):
    import os

    path = Path(tiny_env.paths.models.root) / "checkpoints" / "tiny-sd1.safetensors"
    fp1 = loaders.checkpoint_loader.fingerprint(tiny_env, {"ckpt_name": "tiny-sd1.safetensors"})
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        fp2 = loaders.checkpoint_loader.fingerprint(tiny_env, {"ckpt_name": "tiny-sd1.safetensors"})
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp1 != fp2


def test_manager_is_cheap_and_picks_float32_on_cpu():
    import subprocess
    import sys

    code = ("import sys; from nodes.runtime.models import ModelManager; m = ModelManager(); s = m.stats(); "
            "assert 'torch' not in sys.modules, 'constructing imported torch'; "
            "import nodes.loaders, nodes.text, nodes.vae; assert 'torch' not in sys.modules, 'nodes import torch'; "
            "print(m.device, m.dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        assert out.stdout.split() == ["cpu", "torch.float32"]


def test_offload_under_device_budget():
    """With a device budget too small for two modules, using one moves the other back to the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to move modules between devices")
    manager = ModelManager(device_budget_bytes=1)
    mods = {"a": torch.nn.Linear(256, 256), "b": torch.nn.Linear(256, 256)}
    key = ("test", "x", 0, 0)
    with manager.use(key, "a", lambda m: mods):
        pass
    with manager.use(key, "b", lambda m: mods) as b:
        assert b.weight.device.type == "cuda"
        assert mods["a"].weight.device.type == "cpu"
    assert manager.free() > 0 and mods["b"].weight.device.type == "cpu"


def test_cpu_budget_drops_least_recently_used_entry():
    manager = ModelManager(device="cpu", cpu_budget_bytes=300_000)
    make = lambda m: {"w": torch.nn.Linear(256, 256)}  # noqa: E731 - 263 KB each
    manager.acquire(("t", "a", 0, 0), make)
    manager.acquire(("t", "b", 0, 0), make)
    assert ("t", "a", 0, 0) not in manager and ("t", "b", 0, 0) in manager
    assert manager.stats()["unloads"] == 1


def test_environment_without_manager_still_loads(tmp_path, tiny_models_dir):
    env = Environment(paths=Paths.under(tmp_path / "data", models=tiny_models_dir))
    model = call(loaders.checkpoint_loader, env, ckpt_name="tiny-sd1.safetensors")[0]
    assert model.family.name == "sd1"



def test_comfyui_workflow_loads_once_through_the_executor(tiny_env):
    """A ComfyUI API-format graph with two CheckpointLoaderSimple nodes on one file: one load, one copy."""
    from PIL import Image

    import nodes.image
    import nodes.text
    import nodes.vae
    from engine.executor import Executor
    from engine.registry import Registry
    from engine.workflow import parse

    registry = Registry()
    for module in (loaders, nodes.image, nodes.text, nodes.vae):
        registry.add_module(module)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(Path(tiny_env.paths.input.root) / "red.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "tiny-sd1.safetensors", "prediction": "epsilon"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["2", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "rt"}},
    }
    outcome = Executor(registry, tiny_env).run(parse(graph))
    assert outcome.status == "succeeded", outcome
    assert list(Path(tiny_env.paths.output.root).glob("rt*.png"))
    stats = tiny_env.models.stats()
    assert stats["loaded"] == 1 and stats["loads"] == 1


def test_vae_files_in_other_layouts(tiny_env):
    """A diffusers-layout VAE file and an original-layout one with the checkpoint prefix both load."""
    from safetensors.torch import save_file

    from nodes.checkpoint.to_original import vae_to_original

    src = tm.components("sdxl")["vae"]
    folder = Path(tiny_env.paths.models.root) / "vae"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "diffusers-layout-xl.safetensors"))
    save_file(vae_to_original(src.state_dict(), dict(src.config)), str(folder / "prefixed.safetensors"))
    try:
        for name in ("diffusers-layout-xl.safetensors", "prefixed.safetensors"):
            handle = call(loaders.vae_loader, tiny_env, vae_name=name)[0]
            with handle._use_vae() as v:
                assert _same_weights(v, src) == [], name
        assert handle.latent_scale == 0.18215
        assert call(loaders.vae_loader, tiny_env, vae_name="diffusers-layout-xl.safetensors")[0].latent_scale == 0.13025
    finally:
        (folder / "diffusers-layout-xl.safetensors").unlink()
        (folder / "prefixed.safetensors").unlink()


def test_fp16_variant_folders_load_and_the_variant_follows_the_compute_dtype(tmp_path):
    """``save_pretrained(variant="fp16")`` names its files ``*.fp16.safetensors``; hub downloads of only
    those are common. Such a folder loads as diffusers' own ``from_pretrained(variant="fp16")`` does.
    Where both files are there, a fp32 load reads the full file and a fp16 load the variant (its values
    are the full file's cast: here they are made to differ, to see which file was read)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from nodes.checkpoint.load import load_checkpoint

    both = tmp_path / "both"
    tm.pipeline("sd1", parts=tm.fresh_components("sd1")).save_pretrained(str(both), safe_serialization=True)
    variant = tm.pipeline("sd1", parts=tm.fresh_components("sd1", seed=1)).to(torch.float16)
    variant.save_pretrained(str(both), safe_serialization=True, variant="fp16")
    only = tmp_path / "only-fp16"
    shutil.copytree(both, only)
    for full in [*only.glob("*/diffusion_pytorch_model.safetensors"), *only.glob("*/model.safetensors")]:
        full.unlink()
    reference = StableDiffusionPipeline.from_pretrained(str(only), variant="fp16", local_files_only=True)
    loaded = load_checkpoint(only, torch.float32).modules
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = loaded[name].state_dict(), getattr(reference, name).state_dict()
        assert all(v.dtype == torch.float32 and torch.equal(v, theirs[k].float()) for k, v in ours.items()), name
    full = tm.fresh_components("sd1")["unet"].state_dict()
    assert all(torch.equal(v, full[k]) for k, v in load_checkpoint(both, torch.float32).modules["unet"].state_dict().items())
    half = variant.unet.state_dict()
    as_half = load_checkpoint(both, torch.float16).modules["unet"].state_dict()
    assert all(v.dtype == torch.float16 and torch.equal(v, half[k]) for k, v in as_half.items())
    assert not torch.equal(half["conv_in.weight"].float(), full["conv_in.weight"])  # not vacuous: the files differ
