"""SDXL ControlNet Union (xinsir's layout, diffusers' ControlNetUnionModel) on the tiny SDXL:
loading one file or a folder, parity with diffusers' union img2img pipeline per control type,
ComfyUI's "auto", the API-format graph, and the errors.

Parity convention as tests/test_controlnet.py: ControlNetApplyAdvanced at strength s on the
whole range is the pipeline's ``controlnet_conditioning_scale=s``; SetUnionControlNetType's
type is the pipeline's ``control_mode`` (its index in ComfyUI's list).
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch

import tiny_models
from engine.context import NodeError
from node_call import Called, call, environment_over
from nodes.controlnet import controlnet_apply_advanced, controlnet_loader, set_union_controlnet_type
from test_controlnet import CFG, SEED, STEPS, STRENGTH, advanced, hint_image, kiln
from test_sampling import PIXEL_TOL, sdxl  # noqa: F401 (fixture)

UNION, PLAIN_XL, FOLDER, OLD = "union.safetensors", "xl.safetensors", "union-folder", "union-6.safetensors"
#: a union folder whose config.json names plain ControlNetModel (as some re-uploads do): told by its weights
MISLABELLED = "union-folder-mislabelled"


def tiny_union(types: int = 8, seed: int = 5, heads: int = 8):
    """A union ControlNet for the tiny SDXL: the tiny SDXL ControlNet's weights plus a union part,
    every union weight moved off its initial value (``spatial_ch_projs`` starts at zero)."""
    from diffusers import ControlNetUnionModel

    plain = tiny_models.controlnet("sdxl")
    config = {k: v for k, v in dict(plain.config).items() if not k.startswith("_")}
    config["addition_time_embed_dim"] = tiny_models.components("sdxl")["unet"].config.addition_time_embed_dim
    width = config["block_out_channels"][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        accepted = inspect.signature(ControlNetUnionModel.__init__).parameters
        net = ControlNetUnionModel(**{k: v for k, v in config.items() if k in accepted},
                                   num_control_type=types, num_trans_channel=width, num_trans_head=heads,
                                   num_trans_layer=1, num_proj_channel=width)
        missing, _ = net.load_state_dict(plain.state_dict(), strict=False)
        assert missing and all(k.startswith(("task_embedding", "transformer_layes", "spatial_ch_projs",
                                             "control_add_embedding")) for k in missing)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(("transformer_layes", "spatial_ch_projs", "control_add_embedding")):
                    p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("xl-union")
    models = root / "models"
    tiny_models.save_single_file("sdxl", models / "checkpoints" / tiny_models.checkpoint_name("sdxl"))
    (models / "controlnet").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_union().state_dict().items()}, str(models / "controlnet" / UNION))
    save_file({k: v.contiguous() for k, v in tiny_union(6).state_dict().items()}, str(models / "controlnet" / OLD))
    # a head count other than xinsir's 8, which only the folder's config.json can tell
    tiny_union(heads=4).save_pretrained(str(models / "controlnet" / FOLDER), safe_serialization=True)
    tiny_models.save_controlnet(tiny_models.controlnet("sdxl"), models / "controlnet" / PLAIN_XL)
    tiny_union().save_pretrained(str(models / "controlnet" / MISLABELLED), safe_serialization=True)
    config = json.loads((models / "controlnet" / MISLABELLED / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith(("num_control", "num_trans", "num_proj"))}
    (models / "controlnet" / MISLABELLED / "config.json").write_text(json.dumps(dict(config, _class_name="ControlNetModel")))
    yield from environment_over(models, root)


def load(env, name: str):
    return call(controlnet_loader, env, control_net_name=name)[0]


def typed(cn, type: str):
    return call(set_union_controlnet_type, None, control_net=cn, type=type)[0]


def reference(tiny, mode: int, scale: float) -> torch.Tensor:
    import diffusers

    parts = dict(tiny.parts, controlnet=tiny_union())
    pipe = tiny_models.pipeline("sdxl", cls=diffusers.StableDiffusionXLControlNetUnionImg2ImgPipeline, parts=parts)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(image=tiny.init * tiny.scale, control_image=[hint_image().movedim(-1, 1)], control_mode=mode,
                   strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=CFG,
                   controlnet_conditioning_scale=scale, guess_mode=False,
                   generator=torch.Generator().manual_seed(SEED), output_type="pt", **tiny.embeds).images
    return ref.permute(0, 2, 3, 1)


# -- loading ------------------------------------------------------------------------------------------

def test_file_and_folder_load_the_union_with_its_shapes(env):
    union, folder, old, mislabelled = load(env, UNION), load(env, FOLDER), load(env, OLD), load(env, MISLABELLED)
    assert union.family.name == "sdxl" and union.config["num_control_type"] == 8 and old.config["num_control_type"] == 6
    assert union.config["num_trans_channel"] == 32 and union.config["addition_time_embed_dim"] == 8
    assert union.config["num_trans_head"] == 8 and folder.config["num_trans_head"] == 4
    want = tiny_union().state_dict()
    for handle in (union, folder, mislabelled):
        with handle.use() as net:
            assert type(net).__name__ == "ControlNetUnionModel"
            got = net.state_dict()
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# -- numerics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type,mode,scale", [("depth", 1, 1.0), ("canny/lineart/anime_lineart/mlsd", 3, 0.7)])
def test_union_img2img_equals_diffusers_union_pipeline(env, sdxl, type, mode, scale):
    cn = typed(load(env, UNION), type)
    assert cn.mode == mode
    ours = kiln(sdxl, *advanced(sdxl, cn, strength=scale))
    ref = reference(sdxl, mode, scale)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    plain = kiln(sdxl, sdxl.pos, sdxl.neg)
    assert (ours - plain).abs().max().item() > 0.02  # the ControlNet moved the image


def test_type_matters_and_auto_adds_the_hint_without_the_offsets(env, sdxl):
    union = load(env, UNION)
    depth, pose, auto = (kiln(sdxl, *advanced(sdxl, typed(union, t))) for t in ("depth", "openpose", "auto"))
    assert (depth - pose).abs().max().item() > 0.02
    assert (auto - depth).abs().max().item() > 0.02
    # auto is ComfyUI's: the encoded hint is added to the latent's features as is (no transformer offsets);
    # typed, the offsets are added as well (diffusers' and xinsir's rule)
    from types import SimpleNamespace

    from nodes.control.sdxl_union import run

    x, hint = torch.randn(1, 4, 8, 8), hint_image().movedim(-1, 1)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 64), "time_ids": torch.full((1, 6), 64.0)}}
    seen = []
    with union.use() as net, torch.no_grad():
        hook = net.down_blocks[0].register_forward_pre_hook(lambda _m, args, kw: seen.append(
            (args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
        try:
            for mode in (None, 1):
                link = SimpleNamespace(net=SimpleNamespace(mode=mode, name="u"), strength=1.0)
                run(net, link, x, torch.tensor(500.0), torch.randn(1, 77, 128), extra, hint)
        finally:
            hook.remove()
        plain = net.conv_in(x) + net.controlnet_cond_embedding(hint)
        assert net.spatial_ch_projs(torch.ones(1, 32)).abs().max() > 0  # auto's silencing ends with its call
    assert (seen[0] - plain).abs().max() < 1e-5 and (seen[1] - plain).abs().max() > 1e-2


def test_strength_zero_is_no_controlnet(env, sdxl):
    cn = typed(load(env, UNION), "depth")
    pos, neg = advanced(sdxl, cn, strength=0.0)
    assert torch.equal(kiln(sdxl, pos, neg), kiln(sdxl, sdxl.pos, sdxl.neg))


# -- the ComfyUI graph -------------------------------------------------------------------------------------

def test_comfyui_api_graph_runs_unchanged(env):
    from PIL import Image

    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse

    Image.fromarray((hint_image()[0].numpy() * 255).astype("uint8")).save(env.paths.input.root / "hint.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_models.checkpoint_name("sdxl")}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red barn", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "5": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": UNION}},
        "6": {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["5", 0], "type": "depth"}},
        "7": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["6", 0], "image": ["4", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["7", 0], "negative": ["7", 1],
                                                   "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "xl-union"}},
    }

    def run() -> torch.Tensor:
        outcome = Executor(default_registry(), env).run(parse(graph))
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        return outcome.results["10"][0]

    depth = run()
    graph["6"]["inputs"]["type"] = "openpose"
    pose = run()
    graph["7"]["inputs"]["strength"] = 0.0
    off = run()
    assert (depth - pose).abs().max().item() > 0.02 and (pose - off).abs().max().item() > 0.02


# -- errors ----------------------------------------------------------------------------------------------

def test_bad_types_name_the_input(env):
    with pytest.raises(NodeError) as err:
        typed(load(env, OLD), "repaint")  # controlnet-union-sdxl-1.0 knows 6 types, ProMax 8
    assert err.value.input_name == "type" and "6" in str(err.value)
    with pytest.raises(NodeError) as err:
        typed(load(env, UNION), "nope")
    assert err.value.input_name == "type"
    rec = Called()
    plain = load(env, PLAIN_XL)
    (same,) = call(set_union_controlnet_type, None, rec, control_net=plain, type="depth")
    assert same is plain and any("not a union" in m for m in rec.messages)  # ComfyUI ignores it too


def test_union_controlnet_on_another_family_is_refused(env):
    import test_sampling

    sd1 = test_sampling.Tiny("sd1")
    pos, neg = call(controlnet_apply_advanced, None, positive=sd1.pos, negative=sd1.neg,
                    control_net=typed(load(env, UNION), "depth"), image=hint_image(), strength=1.0,
                    start_percent=0.0, end_percent=1.0)
    with pytest.raises(NodeError) as err:
        kiln(sd1, pos, neg)
    assert err.value.input_name in ("positive", "negative") and "sdxl ControlNet" in str(err.value)
