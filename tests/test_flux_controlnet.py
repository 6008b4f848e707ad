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
PLAIN, UNION = "tiny-flux-cn.safetensors", "tiny-flux-union.safetensors"


@functools.lru_cache(maxsize=None)
def tiny_controlnet(union: bool = False, seed: int = 3):
    """A FluxControlNetModel with the tiny transformer's sizes; its zero layers made to matter."""
    from diffusers import FluxControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FluxControlNetModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
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
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("flux-cn")
    folder = root / "models" / "controlnet"
    folder.mkdir(parents=True)
    for name, union in ((PLAIN, False), (UNION, True)):
        save_file({k: v.contiguous() for k, v in tiny_controlnet(union).state_dict().items()}, str(folder / name))
    yield from environment_over(root / "models", root)


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

def test_controlnet_loader_reads_diffusers_flux_files(env):
    rec = Called()
    (cn,) = call(controlnet_loader, env, rec, control_net_name=PLAIN)
    assert cn.family.name == "flux" and "flux ControlNet" in rec.messages[0]
    assert cn.config["attention_head_dim"] == tiny_flux.HEAD_DIM and tuple(cn.config["axes_dims_rope"]) == tiny_flux.AXES
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


# -- numerics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_img2img_equals_flux_controlnet_img2img_pipeline(env, monkeypatch, scale):
    ours = kiln(*apply(load(env, PLAIN), strength=scale))
    theirs = diffusers_reference(monkeypatch, tiny_controlnet(), scale)
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


# -- errors --------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_input(env):
    cn = load(env, PLAIN)
    with pytest.raises(NodeError) as err:
        apply(cn, with_vae=False)
    assert err.value.input_name == "vae" and "vae" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(controlnet_apply, None, conditioning=conditioning(), control_net=cn, image=hint_image(), strength=1.0)
    assert err.value.input_name == "control_net" and "vae" in str(err.value)
    import tiny_models
    from nodes import families

    sd = tiny_models.controlnet("sd1")
    sd_cn = ControlNetHandle(name="sd-cn", family=families.by_name("sd1"), config=dict(sd.config),
                             _use=lambda: contextlib.nullcontext(sd))
    with pytest.raises(NodeError) as err:
        kiln(*apply(sd_cn))
    assert err.value.input_name in ("positive", "negative")
    assert "sd1 ControlNet" in str(err.value) and "flux" in str(err.value) and "sd-cn" in str(err.value)
