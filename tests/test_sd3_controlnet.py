"""SD3 ControlNets (diffusers' SD3ControlNetModel layout, InstantX's) on the tiny SD3.5:
loading, txt2img parity with StableDiffusion3ControlNetPipeline, ComfyUI's graphs
(ControlNetApplyAdvanced with its vae, and ControlNetApplySD3), strength 0, and the errors.

Parity convention: ControlNetApplyAdvanced at strength s on the whole range is the
pipeline's ``controlnet_conditioning_scale=s``; the hint goes to the pipeline as a PIL image
(a tensor would reach its VAE un-normalised, in 0..1). diffusers samples the hint's VAE posterior
(``latent_dist.sample()``), ComfyUI and Kiln take its mean, so the reference is run with
the posterior's sample replaced by its mean.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import tiny_models
import tiny_sd3
from engine.context import NodeError
from node_call import call, environment_over
from nodes import loaders, sampling, text
from nodes.controlnet import controlnet_apply_advanced, controlnet_apply_sd3, controlnet_loader
from nodes.flux_nodes import empty_sd3_latent_image

PIXEL_TOL = 1 / 255 + 1e-6
SIZE, STEPS, CFG, SEED = 64, 4, 4.5, 5
PROMPT, NEGATIVE = "a red barn in a field", "blurry, dark"
CKPT, CN, CN_FOLDER = "tiny-sd3-large.safetensors", "tiny-sd3-cn.safetensors", "tiny-sd3-cn-folder"
#: SD3.5 Large style, as a folder: its attention has no q/k norm, so only config.json gives the tiny head width
LARGE_CN = "tiny-sd35-large-cn-folder"


def tiny_controlnet(seed: int = 11, large: bool = False):
    """An InstantX-style SD3 ControlNet for the tiny SD3.5 (one joint block for its two), or with
    ``large`` one shaped as Stability's SD3.5 Large ControlNets (the transformer's patch embedder,
    no prompt, the prompt's pooled text, two blocks); every weight moved off its initial value (the
    zero-initialised hint embedder and output layers strongly)."""
    from diffusers import SD3ControlNetModel

    width = tiny_sd3.HEADS * tiny_sd3.HEAD_DIM
    kind = (dict(num_layers=2, joint_attention_dim=None, use_pos_embed=False, force_zeros_for_pooled_projection=False)
            if large else dict(num_layers=1, joint_attention_dim=tiny_sd3.T5, qk_norm="rms_norm",
                               force_zeros_for_pooled_projection=True))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=16, attention_head_dim=tiny_sd3.HEAD_DIM,
                                 num_attention_heads=tiny_sd3.HEADS, caption_projection_dim=width,
                                 pooled_projection_dim=tiny_sd3.CLIP_L + tiny_sd3.CLIP_G, out_channels=16,
                                 pos_embed_max_size=16, **kind)
        with torch.no_grad():
            for name, p in net.named_parameters():
                strong = name.startswith(("controlnet_blocks", "pos_embed_input"))
                p.add_(torch.randn_like(p) * (0.3 if strong else 0.02))
    return net.eval()


def hint_image() -> torch.Tensor:
    """IMAGE [1, 64, 64, 3]: a white square and a bar on black."""
    img = torch.zeros(1, SIZE, SIZE, 3)
    img[:, 12:40, 16:44] = 1.0
    img[:, 48:56, 4:60] = 1.0
    return img


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd3-cn")
    models = root / "models"
    tiny_sd3._save(models / "checkpoints" / CKPT, tiny_sd3.single_file("large"))
    (models / "controlnet").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_controlnet().state_dict().items()}, str(models / "controlnet" / CN))
    tiny_controlnet().save_pretrained(str(models / "controlnet" / CN_FOLDER), safe_serialization=True)
    tiny_controlnet(large=True).save_pretrained(str(models / "controlnet" / LARGE_CN), safe_serialization=True)
    yield from environment_over(models, root)


def load(env, name: str = CN):
    return call(controlnet_loader, env, control_net_name=name)[0]


def kiln(env, strength: float = 0.8, node=controlnet_apply_advanced, cn=None, with_vae: bool = True) -> torch.Tensor:
    model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=CKPT)
    pos = call(text.clip_text_encode, env, text=PROMPT, clip=clip)[0]
    neg = call(text.clip_text_encode, env, text=NEGATIVE, clip=clip)[0]
    if strength is not None:
        extra = {"vae": vae} if with_vae else {}
        pos, neg = call(node, env, positive=pos, negative=neg, control_net=cn or load(env), image=hint_image(),
                        strength=strength, start_percent=0.0, end_percent=1.0, **extra)
    (latent,) = call(empty_sd3_latent_image, env, width=SIZE, height=SIZE, batch_size=1)
    (out,) = call(sampling.ksampler, env, model=model, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent)
    with vae.module() as v:
        return tiny_models.decode(v, out["samples"])


def reference(monkeypatch, strength: float = 0.8, large: bool = False) -> torch.Tensor:
    from diffusers import StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders import vae as vae_module

    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    from PIL import Image

    pipe = StableDiffusion3ControlNetPipeline(**dict(tiny_sd3.components("large")), controlnet=tiny_controlnet(large=large))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, control_image=Image.fromarray((hint_image()[0].numpy() * 255).astype("uint8")),
                   controlnet_conditioning_scale=strength, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt").images
    return out.permute(0, 2, 3, 1)


# -- loading ---------------------------------------------------------------------------------------

def test_file_and_folder_load_the_controlnet_from_its_shapes(env):
    want = tiny_controlnet()
    for name in (CN, CN_FOLDER):
        handle = load(env, name)
        assert handle.family.name == "sd3" and handle.config["num_layers"] == 1
        assert handle.config["force_zeros_for_pooled_projection"] is True
        with handle.use() as net:
            got, ref = net.state_dict(), want.state_dict()
            assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


# -- numerics ----------------------------------------------------------------------------------------

def test_txt2img_equals_sd3_controlnet_pipeline_and_strength_zero_is_no_controlnet(env, monkeypatch):
    ours = kiln(env)
    theirs = reference(monkeypatch)
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
    plain = kiln(env, strength=None)
    assert (ours - plain).abs().max().item() > 0.02  # the ControlNet moved the image
    assert torch.equal(kiln(env, strength=0.0), plain)
    # ComfyUI's SD3-era node is the same apply with the vae required
    assert torch.equal(kiln(env, node=controlnet_apply_sd3), ours)


def test_comfyui_api_graph_runs_unchanged(env, monkeypatch):
    from PIL import Image

    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse

    Image.fromarray((hint_image()[0].numpy() * 255).astype("uint8")).save(env.paths.input.root / "hint.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "5": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CN}},
        "6": {"class_type": "ControlNetApplySD3", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["5", 0], "vae": ["1", 2], "image": ["4", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": CFG,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["6", 1],
                                                   "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "sd3-cn"}},
    }
    outcome = Executor(default_registry(), env).run(parse(graph))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    assert (outcome.results["9"][0] - reference(monkeypatch)).abs().max().item() <= PIXEL_TOL


def test_sd35_large_style_controlnet_borrows_the_patch_embedder_and_equals_the_pipeline(env, monkeypatch):
    cn = load(env, LARGE_CN)
    assert cn.config["use_pos_embed"] is False and cn.config["joint_attention_dim"] is None
    ours = kiln(env, cn=cn)
    theirs = reference(monkeypatch, large=True)
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
    assert (ours - kiln(env, strength=None)).abs().max().item() > 0.02


def test_controlnets_of_different_depths_stack_block_by_block(env):
    """Two applications at 0.4 are one at 0.8 (samples add); a one-block and a two-block ControlNet stack."""
    model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=CKPT)
    pos = call(text.clip_text_encode, env, text=PROMPT, clip=clip)[0]
    neg = call(text.clip_text_encode, env, text=NEGATIVE, clip=clip)[0]

    def apply(pos, neg, cn, strength):
        return call(controlnet_apply_advanced, env, positive=pos, negative=neg, control_net=cn, image=hint_image(),
                    strength=strength, start_percent=0.0, end_percent=1.0, vae=vae)

    def sample(pos, neg):
        (latent,) = call(empty_sd3_latent_image, env, width=SIZE, height=SIZE, batch_size=1)
        (out,) = call(sampling.ksampler, env, model=model, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                      scheduler="normal", positive=pos, negative=neg, latent_image=latent)
        with vae.module() as v:
            return tiny_models.decode(v, out["samples"])

    cn, large = load(env), load(env, LARGE_CN)
    twice = sample(*apply(*apply(pos, neg, cn, 0.4), cn, 0.4))
    once = sample(*apply(pos, neg, cn, 0.8))
    assert (twice - once).abs().max().item() <= PIXEL_TOL
    both = sample(*apply(*apply(pos, neg, cn, 0.8), large, 0.8))
    assert (both - once).abs().max().item() > 0.02 and (both - sample(*apply(pos, neg, large, 0.8))).abs().max() > 0.02


# -- errors -------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_input(env):
    with pytest.raises(NodeError) as err:
        kiln(env, with_vae=False)
    assert err.value.input_name == "vae" and "sd3" in str(err.value)
    from test_sampling import Tiny

    sdxl = Tiny("sdxl")
    pos, neg = call(controlnet_apply_advanced, None, positive=sdxl.pos, negative=sdxl.neg, control_net=load(env),
                    image=hint_image(), strength=1.0, start_percent=0.0, end_percent=1.0, vae=_sdxl_like_vae())
    from nodes.latent import add_noise

    (lat,) = add_noise(_ctx(), sdxl.model, {"samples": sdxl.init}, 0.7, 1)
    with pytest.raises(NodeError) as err:
        sampling.ksampler(_ctx(), sdxl.model, 1, 2, 5.0, "euler", "normal", pos, neg, lat)
    assert err.value.input_name in ("positive", "negative")
    assert "sd3 ControlNet" in str(err.value) and "sdxl" in str(err.value) and CN in str(err.value)
    from safetensors.torch import save_file

    state = {k: v for k, v in tiny_controlnet().state_dict().items() if not k.startswith("time_text_embed.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(env.paths.models.root / "controlnet" / "cut.safetensors"))
    with pytest.raises(NodeError) as err:
        load(env, "cut.safetensors")
    assert err.value.input_name == "control_net_name" and "SD3 ControlNet" in str(err.value)
    stability = {"pos_embed_input.proj.weight": torch.zeros(32, 16, 2, 2), "controlnet_blocks.0.weight": torch.zeros(32, 32),
                 "transformer_blocks.0.adaLN_modulation.1.bias": torch.zeros(192)}
    save_file(stability, str(env.paths.models.root / "controlnet" / "stability.safetensors"))
    with pytest.raises(NodeError) as err:
        load(env, "stability.safetensors")
    assert err.value.input_name == "control_net_name" and "Stability's own layout" in str(err.value)


def _sdxl_like_vae():
    """A 16-channel VAE handle (the SD3 ControlNet's apply check passes; the model is SDXL)."""
    from nodes.handles import VaeHandle

    net = tiny_sd3.components("large")["vae"]
    return VaeHandle(latent_scale=1.5305, latent_channels=16, _use_vae=lambda: contextlib.nullcontext(net))


def _ctx():
    from test_sampling import Recorder

    return Recorder().ctx
