"""FLUX.1 ControlNets (InstantX / Shakker-Labs layout) on the tiny FLUX: Kiln's nodes against
diffusers' FluxControlNetImg2ImgPipeline.

The tiny ControlNet has the tiny transformer's sizes (1 double + 1 single block), its
zero-initialised layers perturbed so it changes the image, and is saved as one
.safetensors in diffusers' layout under models/controlnet, read by ControlNetLoader.

Both sides get the same weights, init image, hint, seed, steps, strength, guidance and
ControlNet scale. diffusers samples the VAE posterior (init image and hint) with the
noise generator where Kiln, like ComfyUI, takes its mean; the reference is run with its
``retrieve_latents`` pinned to the mean, so both encode alike and the generator's first
draw is the noise on both sides. The pipeline takes a tensor ``control_image`` as it is
(only PIL images are brought to -1..1), so the hint is handed over in -1..1.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import tiny_flux
from engine.context import NodeError
from node_call import Called, call, environment_over
from nodes.control.apply import ControlNetHandle, mismatch
from nodes.controlnet import (controlnet_apply, controlnet_apply_advanced, controlnet_loader,
                              set_union_controlnet_type)
from nodes.handles import VaeHandle
from nodes.latent import add_noise
from nodes.sampling import ksampler
from test_flux import PIXEL_TOL, Recorder, _embeds, _model


STEPS, STRENGTH, GUIDANCE, SEED = 6, 0.75, 3.5, 42
PROMPT = "a lighthouse on a cliff"
PLAIN, UNION, DOUBLE_ONLY = "tiny-flux-cn.safetensors", "tiny-flux-union.safetensors", "tiny-flux-cn-double.safetensors"
FOLDER = "tiny-flux-cn-diffusers"
BLIND = "tiny-flux-cn-blind-guidance.safetensors"
NETS = {PLAIN: dict(), UNION: dict(union=True), DOUBLE_ONLY: dict(singles=0)}


@functools.lru_cache(maxsize=None)
def tiny_controlnet(union: bool = False, singles: int = 1, seed: int = 3):
    """A FluxControlNetModel with the tiny transformer's sizes; its zero layers made to matter.
    ``singles`` 0: no single blocks, as Shakker-Labs' Union Pro 2.0 has none."""
    from diffusers import FluxControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FluxControlNetModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=singles,
                                  attention_head_dim=tiny_flux.HEAD_DIM, num_attention_heads=tiny_flux.HEADS,
                                  joint_attention_dim=tiny_flux.TEXT, pooled_projection_dim=tiny_flux.TEXT,
                                  guidance_embeds=True, axes_dims_rope=tiny_flux.AXES,
                                  num_mode=10 if union else None)
        with torch.no_grad():
            for name, p in net.named_parameters():
                zeroed = name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder"))
                p.add_(torch.randn_like(p) * (0.3 if zeroed else 0.02))
    return net.eval()


def hint_image() -> torch.Tensor:
    """IMAGE [1, 64, 64, 3]: a white square and a bar on black (an edge-map-like hint)."""
    img = torch.zeros(1, 64, 64, 3)
    img[:, 12:40, 16:44] = 1.0
    img[:, 48:56, 4:60] = 1.0
    return img


def init_image() -> torch.Tensor:
    """IMAGE [1, 64, 64, 3]: smooth colour ramps (the img2img input)."""
    ramp = torch.linspace(0, 1, 64)
    return torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64),
                        (1 - ramp)[None, :].expand(64, 64)], dim=-1)[None]


def vae() -> VaeHandle:
    net = tiny_flux.components("dev")["vae"]
    return VaeHandle(latent_scale=0.3611, latent_channels=16, _use_vae=lambda: contextlib.nullcontext(net))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny FLUX's split files (tiny_flux.make_models_folder) and the ControlNets in models/controlnet."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("flux-cn")
    models = tiny_flux.make_models_folder(root / "models")
    (models / "controlnet").mkdir()
    for name, kind in NETS.items():
        state = tiny_controlnet(**kind).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(models / "controlnet" / name))
    tiny_controlnet().save_pretrained(str(models / "controlnet" / FOLDER), safe_serialization=True)
    blind = tiny_controlnet().state_dict()  # PLAIN with a guidance embedder that embeds nothing
    for key in ("time_text_embed.guidance_embedder.linear_2.weight", "time_text_embed.guidance_embedder.linear_2.bias"):
        blind[key] = torch.zeros_like(blind[key])
    save_file({k: v.contiguous() for k, v in blind.items()}, str(models / "controlnet" / BLIND))
    yield from environment_over(models, root)


def load(env, name: str) -> ControlNetHandle:
    return call(controlnet_loader, env, control_net_name=name)[0]


def conditioning() -> list:
    embeds, pooled = _embeds("dev")
    return [[embeds, {"pooled_output": pooled, "guidance": GUIDANCE}]]


def apply(cn, strength: float = 1.0, start: float = 0.0, end: float = 1.0, cond=None, with_vae: bool = True):
    cond = cond if cond is not None else conditioning()
    return call(controlnet_apply_advanced, None, positive=cond, negative=cond, control_net=cn, image=hint_image(),
                strength=strength, start_percent=start, end_percent=end, vae=vae() if with_vae else None)


def kiln(positive, negative=None) -> torch.Tensor:
    """KSampler img2img (euler, cfg 1) from the VAE-encoded init image; decoded IMAGE."""
    model = _model("dev")
    latent = {"samples": vae().encode(init_image())}
    (latent,) = add_noise(Recorder().ctx, model, latent, strength=STRENGTH, seed=SEED)
    (out,) = ksampler(Recorder().ctx, model, SEED, STEPS, 1.0, "euler", "normal", positive,
                      negative if negative is not None else positive, latent)
    return vae().decode(out["samples"])


def diffusers_reference(monkeypatch, net, scale: float, mode: int | None = None) -> torch.Tensor:
    from diffusers import FluxControlNetImg2ImgPipeline
    from diffusers.pipelines.flux import pipeline_flux_controlnet_image_to_image as module

    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode())
    embeds, pooled = _embeds("dev")
    pipe = FluxControlNetImg2ImgPipeline(**dict(tiny_flux.components("dev")), controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=init_image().movedim(-1, 1),
                   control_image=hint_image().movedim(-1, 1) * 2 - 1, control_mode=mode, strength=STRENGTH, height=64,
                   width=64, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   controlnet_conditioning_scale=scale, generator=torch.Generator().manual_seed(SEED),
                   output_type="pt").images
    return out.permute(0, 2, 3, 1)


# -- loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [PLAIN, FOLDER])
def test_controlnet_loader_reads_diffusers_flux_files(env, name):
    rec = Called()
    (cn,) = call(controlnet_loader, env, rec, control_net_name=name)
    assert cn.family.name == "flux" and "flux ControlNet" in rec.messages[0]
    assert cn.config["attention_head_dim"] == tiny_flux.HEAD_DIM
    assert tuple(cn.config["axes_dims_rope"]) == tiny_flux.AXES  # the transformer's rule, from the head width
    assert cn.config["num_layers"] == 1 and cn.config["num_single_layers"] == 1 and cn.config.get("num_mode") is None
    with cn.use() as network:
        want = tiny_controlnet().state_dict()
        got = network.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert load(env, UNION).config["num_mode"] == 10
    # [dev] and [schnell] take the same ControlNets; an SD model does not
    from nodes import families

    assert mismatch(cn, families.by_name("flux-schnell"), dict(tiny_flux.components("schnell")["transformer"].config)) \
        is None
    assert "flux ControlNet" in mismatch(cn, families.by_name("sd1"), None)
    wider = dict(tiny_flux.components("dev")["transformer"].config, num_attention_heads=tiny_flux.HEADS * 2)
    assert "num_attention_heads" in mismatch(cn, families.by_name("flux"), wider)  # another FLUX-like size


# -- numerics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,scale", [(PLAIN, 1.0), (PLAIN, 0.6), (DOUBLE_ONLY, 1.0)])
def test_img2img_equals_flux_controlnet_img2img_pipeline(env, monkeypatch, name, scale):
    ours = kiln(*apply(load(env, name), strength=scale))
    theirs = diffusers_reference(monkeypatch, tiny_controlnet(**NETS[name]), scale)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
    plain = kiln(conditioning())
    assert (ours - plain).abs().max().item() > 0.02  # the ControlNet changed the image: not vacuous


def test_strength_zero_and_end_zero_are_no_controlnet_and_stacks_add(env):
    cn, plain = load(env, PLAIN), kiln(conditioning())
    assert torch.equal(kiln(*apply(cn, strength=0.0)), plain)
    assert torch.equal(kiln(*apply(cn, end=0.0)), plain)
    full = kiln(*apply(cn))
    late = kiln(*apply(cn, start=0.5))
    assert (late - plain).abs().max().item() > 0.005 and (late - full).abs().max().item() > 0.005
    pos, neg = apply(cn, strength=0.5)
    stacked = kiln(*apply(cn, strength=0.5, cond=pos))
    assert (stacked - full).abs().max().item() <= PIXEL_TOL  # two halves are the whole
    assert pos[0][1]["control"].vae is not None and neg[0][1]["control"] is pos[0][1]["control"]
    # a ControlNet without single blocks stacks on one with them: each adds where it has samples
    double_only = kiln(*apply(load(env, DOUBLE_ONLY)))
    mixed = kiln(*apply(load(env, DOUBLE_ONLY), cond=apply(cn)[0]))
    assert (mixed - full).abs().max().item() > 0.005 and (mixed - double_only).abs().max().item() > 0.005


def test_disabled_guidance_is_disabled_in_the_controlnet_too(env):
    """FluxDisableGuidance leaves the guidance embedding out of the ControlNet's conditioning as
    well as the transformer's: with it, the ControlNet samples as one whose guidance embedder
    embeds nothing (which differs from it under guidance)."""
    from nodes.flux_nodes import flux_disable_guidance

    (off,) = flux_disable_guidance(Recorder().ctx, conditioning())
    ours = kiln(*apply(load(env, PLAIN), cond=off))
    assert (ours - kiln(*apply(load(env, BLIND), cond=off))).abs().max().item() <= 1e-5
    guided = kiln(*apply(load(env, PLAIN)))
    assert (guided - kiln(*apply(load(env, BLIND)))).abs().max().item() > 1e-4


def test_union_type_equals_pipeline_control_mode(env, monkeypatch):
    union = load(env, UNION)
    (depth,) = call(set_union_controlnet_type, None, control_net=union, type="depth")
    assert depth.mode == 1 and union.mode is None
    ours = kiln(*apply(depth))
    theirs = diffusers_reference(monkeypatch, tiny_controlnet(True), 1.0, mode=1)
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
    # The type is one prompt token among 512, so on the tiny model it moves pixels by ~0.002: the
    # match is held far tighter than that, or it would not tell the types apart.
    other = diffusers_reference(monkeypatch, tiny_controlnet(True), 1.0, mode=3)
    assert (ours - theirs).abs().max().item() <= 1e-5 < 1e-3 < (theirs - other).abs().max().item()
    (canny,) = call(set_union_controlnet_type, None, control_net=union, type="canny/lineart/anime_lineart/mlsd")
    assert canny.mode == 3 and (kiln(*apply(canny)) - other).abs().max().item() <= 1e-5
    (auto,) = call(set_union_controlnet_type, None, control_net=union, type="auto")
    assert auto.mode is None and (kiln(*apply(auto)) - ours).abs().max().item() > 5e-4  # no type token at all


def test_union_type_on_a_plain_controlnet_is_ignored_and_said(env):
    plain = load(env, PLAIN)
    rec = Called()
    (same,) = call(set_union_controlnet_type, None, rec, control_net=plain, type="depth")
    assert same is plain and any("control_net" in m and "not a union" in m for m in rec.messages)
    with pytest.raises(NodeError) as err:
        call(set_union_controlnet_type, None, control_net="nope", type="depth")
    assert err.value.input_name == "control_net"


def test_blocks_spread_as_comfyui_and_diffusers_spread_them():
    """InstantX's 5 double blocks over FLUX's 19: each serves ceil(19 / 5) = 4 in turn, the last 3."""
    from nodes.control.flux import spread

    assert spread(list("abcde"), 19) == list("aaaabbbbccccddddeee")
    assert spread(list("ab"), 5) == list("aaabb") and spread(list("a"), 1) == ["a"] and spread(None, 3) == []


def test_controlnet_with_kontext_references_controls_only_the_image_tokens(env):
    """Reference latents add tokens after the image's; the ControlNet's samples cover the image's
    only (ComfyUI adds them to the first tokens), so both act together."""
    from nodes import kontext

    reference = {"samples": torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(11))}
    (with_ref,) = kontext.reference_latent(Recorder().ctx, conditioning(), reference)
    cn = load(env, PLAIN)
    seen: list = []
    hook = tiny_flux.components("dev")["transformer"].register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[1], kw["controlnet_block_samples"][0])),
        with_kwargs=True)
    try:
        both = kiln(*apply(cn, cond=with_ref))
    finally:
        hook.remove()
    image_tokens = 4 * 4
    for tokens, sample in seen:
        assert tokens == image_tokens + 3 * 5 and sample.shape[1] == tokens  # 6x10 reference: 3x5 patches
        assert sample[:, :image_tokens].abs().amax() > 0 and sample[:, image_tokens:].abs().amax() == 0
    ref_only, cn_only = kiln(with_ref), kiln(*apply(cn))
    # on the tiny model the ControlNet outweighs the reference, which still moves pixels by ~1e-3
    assert (both - ref_only).abs().max().item() > 0.02 and (both - cn_only).abs().max().item() > 2e-4


def test_comfyui_api_graph_with_union_controlnet_equals_flux_controlnet_pipeline(env, monkeypatch):
    """A ComfyUI API-format graph on the split files (LoadImage hint, ControlNetLoader,
    SetUnionControlNetType, ControlNetApplyAdvanced with its vae) runs unchanged and equals
    FluxControlNetPipeline, prompt encoding included."""
    from diffusers import FluxControlNetPipeline
    from diffusers.pipelines.flux import pipeline_flux_controlnet as module
    from PIL import Image

    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse

    hint = Image.fromarray((hint_image()[0].numpy() * 255).astype("uint8"))
    hint.save(env.paths.input.root / "hint.png")
    split = dict(unet="tiny-flux-dev.safetensors", clip_l="tiny-clip_l.safetensors", t5="tiny-t5xxl.safetensors",
                 vae="tiny-flux-ae.safetensors")
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": split["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": split["t5"], "clip_name2": split["clip_l"],
                                                         "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": split["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": GUIDANCE}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "7": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": UNION}},
        "8": {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["7", 0], "type": "depth"}},
        "9": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["5", 0], "negative": ["5", 0], "control_net": ["8", 0], "image": ["6", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0, "vae": ["3", 0]}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": 64, "height": 64}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 3, "steps": 4, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["9", 0], "negative": ["9", 1],
                                                    "latent_image": ["10", 0], "denoise": 1.0}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "flux-cn"}},
    }
    outcome = Executor(default_registry(), env).run(parse(graph))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["13"][0]
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode())
    pipe = FluxControlNetPipeline(**dict(tiny_flux.components("dev")), controlnet=tiny_controlnet(union=True))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, control_image=hint, control_mode=1, controlnet_conditioning_scale=0.8, height=64,
                      width=64, num_inference_steps=4, guidance_scale=GUIDANCE,
                      generator=torch.Generator().manual_seed(3), output_type="pt").images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
    graph["9"]["inputs"]["strength"] = 0.0
    off = Executor(default_registry(), env).run(parse(graph)).results["13"][0]
    assert (ours - off).abs().max().item() > 0.02  # the ControlNet acted: not vacuous


# -- errors --------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_input(env):
    cn = load(env, PLAIN)
    with pytest.raises(NodeError) as err:
        apply(cn, with_vae=False)
    assert err.value.input_name == "vae" and "vae" in str(err.value)
    cond = conditioning()
    assert apply(cn, strength=0.0, cond=cond, with_vae=False) == (cond, cond)  # as ComfyUI: nothing to encode
    sd_vae = VaeHandle(latent_scale=0.18215, latent_channels=4, name="sd-vae.safetensors")
    with pytest.raises(NodeError) as err:
        call(controlnet_apply_advanced, None, positive=cond, negative=cond, control_net=cn, image=hint_image(),
             strength=1.0, start_percent=0.0, end_percent=1.0, vae=sd_vae)
    assert err.value.input_name == "vae" and "sd-vae.safetensors" in str(err.value) and "16" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(controlnet_apply, None, conditioning=conditioning(), control_net=cn, image=hint_image(), strength=1.0)
    assert err.value.input_name == "control_net" and "vae" in str(err.value)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_controlnet().state_dict().items() if not k.startswith("context_")}
    save_file(state, str(env.paths.models.root / "controlnet" / "broken.safetensors"))
    with pytest.raises(NodeError) as err:
        load(env, "broken.safetensors")
    assert err.value.input_name == "control_net_name" and "FLUX ControlNet" in str(err.value)
    import tiny_models
    from nodes import families

    sd = tiny_models.controlnet("sd1")
    sd_cn = ControlNetHandle(name="sd-cn", family=families.by_name("sd1"), config=dict(sd.config),
                             _use=lambda: contextlib.nullcontext(sd))
    with pytest.raises(NodeError) as err:
        kiln(*apply(sd_cn))
    assert err.value.input_name in ("positive", "negative")
    assert "sd1 ControlNet" in str(err.value) and "flux" in str(err.value) and "sd-cn" in str(err.value)
