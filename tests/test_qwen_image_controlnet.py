"""Qwen-Image ControlNets (InstantX's Union and Inpainting, diffusers' QwenImageControlNetModel) on the
tiny Qwen-Image: Kiln's nodes against QwenImageControlNetPipeline / QwenImageControlNetInpaintPipeline.

The tiny ControlNets have the tiny transformer's sizes (one block), their zero-initialised layers
perturbed so they change the image, and are saved under models/controlnet as one .safetensors (as
ComfyUI's users have them) and as a diffusers folder (as InstantX ships them), read by
ControlNetLoader. Both sides get the same weights, prompts, hint, seed, steps, true_cfg and scale.
diffusers samples the VAE posterior of the hint (the Union pipeline with the noise generator, the
Inpaint one without a generator) where Kiln, like ComfyUI, takes its mean: the reference is run with
the posterior pinned to its mean, so both encode alike and the generator's first draw is the noise.
The pipelines take a tensor hint as it is, so it is handed over in -1..1.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import tiny_qwen_image
from engine.context import NodeError
from node_call import call, environment_over
from nodes.controlnet import controlnet_apply_advanced, controlnet_inpainting_alimama_apply, controlnet_loader
from nodes.sampling import ksampler
from test_qwen_image import NEGATIVE, PIXEL_TOL, PROMPT, SIZE, Recorder, _clip, _model, _vae

STEPS, CFG, SEED = 4, 4.0, 5
UNION, INPAINT = "tiny-qwen-cn-union.safetensors", "tiny-qwen-cn-inpainting.safetensors"
FOLDER = "tiny-qwen-cn-diffusers"


@functools.lru_cache(maxsize=None)
def tiny_controlnet(inpainting: bool = False, seed: int = 3):
    """A QwenImageControlNetModel with the tiny transformer's sizes; its zero layers made to matter."""
    from diffusers import QwenImageControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = QwenImageControlNetModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=tiny_qwen_image.HEAD_DIM,
            num_attention_heads=tiny_qwen_image.HEADS, joint_attention_dim=tiny_qwen_image.TEXT,
            axes_dims_rope=tiny_qwen_image.AXES, extra_condition_channels=4 if inpainting else 0)
        with torch.no_grad():
            for name, p in net.named_parameters():
                zeroed = name.startswith(("controlnet_blocks", "controlnet_x_embedder"))
                p.add_(torch.randn_like(p) * (0.3 if zeroed else 0.05))
    return net.eval().requires_grad_(False)


def hint_image() -> torch.Tensor:
    """IMAGE [1, 64, 64, 3]: a white square and a bar on black (an edge-map-like hint)."""
    img = torch.zeros(1, SIZE, SIZE, 3)
    img[:, 12:40, 16:44] = 1.0
    img[:, 48:56, 4:60] = 1.0
    return img


def photo() -> torch.Tensor:
    """IMAGE [1, 64, 64, 3]: smooth colour ramps (the image to inpaint)."""
    ramp = torch.linspace(0, 1, SIZE)
    return torch.stack([ramp[None, :].expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE),
                        (1 - ramp)[None, :].expand(SIZE, SIZE)], dim=-1)[None]


def repaint_mask() -> torch.Tensor:
    """MASK [1, 64, 64]: 1 where to repaint; its edges off the 8-pixel grid, so the latent mask's rule shows."""
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 10:45, 21:50] = 1.0
    return mask


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("qwen-cn")
    models = root / "models"
    (models / "controlnet").mkdir(parents=True)
    for name, inpainting in ((UNION, False), (INPAINT, True)):
        state = tiny_controlnet(inpainting).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(models / "controlnet" / name))
    tiny_controlnet().save_pretrained(str(models / "controlnet" / FOLDER), safe_serialization=True)
    yield from environment_over(models, root)


def load(env, name: str):
    return call(controlnet_loader, env, control_net_name=name)[0]


def prompts() -> tuple[list, list]:
    clip = _clip()
    return clip.encode(PROMPT), clip.encode(NEGATIVE)


def apply(cn, strength: float = 1.0, start: float = 0.0, end: float = 1.0, image=None):
    positive, negative = prompts()
    return call(controlnet_apply_advanced, None, positive=positive, negative=negative, control_net=cn,
                image=hint_image() if image is None else image, strength=strength, start_percent=start,
                end_percent=end, vae=_vae())


def inpaint(cn, strength: float = 1.0, mask=None):
    positive, negative = prompts()
    return call(controlnet_inpainting_alimama_apply, None, positive=positive, negative=negative, control_net=cn,
                vae=_vae(), image=photo(), mask=repaint_mask() if mask is None else mask, strength=strength,
                start_percent=0.0, end_percent=1.0)


def kiln(positive, negative) -> torch.Tensor:
    (out,) = ksampler(Recorder().ctx, _model(), SEED, STEPS, CFG, "euler", "normal", positive, negative,
                      {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)})
    return _vae().decode(out["samples"])


def at_mean(monkeypatch) -> None:
    """The reference pipelines' VAE posterior pinned to its mean (see the module docstring)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_controlnet as module

    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode())
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def reference(monkeypatch, scale: float, inpainting: bool = False) -> torch.Tensor:
    from diffusers import QwenImageControlNetInpaintPipeline, QwenImageControlNetPipeline

    at_mean(monkeypatch)
    cls = QwenImageControlNetInpaintPipeline if inpainting else QwenImageControlNetPipeline
    pipe = cls(**dict(tiny_qwen_image.components()), controlnet=tiny_controlnet(inpainting))
    pipe.set_progress_bar_config(disable=True)
    control = {"control_image": photo().movedim(-1, 1) * 2 - 1, "control_mask": repaint_mask()[:, None]} \
        if inpainting else {"control_image": hint_image().movedim(-1, 1) * 2 - 1}
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   true_cfg_scale=CFG, controlnet_conditioning_scale=scale,
                   generator=torch.Generator().manual_seed(SEED), output_type="pt", **control).images
    return out.permute(0, 2, 3, 1)


# -- loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [UNION, FOLDER, INPAINT])
def test_controlnet_loader_reads_instantx_files_and_folders(env, name):
    cn = load(env, name)
    assert cn.family.name == "qwen_image"
    net = tiny_controlnet(name == INPAINT)
    with cn.use() as loaded:
        assert type(loaded).__name__ == "QwenImageControlNetModel"
        assert loaded.config.extra_condition_channels == net.config.extra_condition_channels
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


# -- the Union ControlNet: txt2img with true CFG -----------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_txt2img_equals_qwen_image_controlnet_pipeline(env, monkeypatch, scale):
    ours = kiln(*apply(load(env, UNION), strength=scale))
    theirs = reference(monkeypatch, scale)
    gap = float((ours - theirs).abs().max())
    print(f"controlnet txt2img scale {scale}: max diff {gap * 255:.4f}/255")
    assert gap <= PIXEL_TOL
    plain = kiln(*prompts())
    assert (ours - plain).abs().max() > 0.02  # the ControlNet moves the image
    other = hint_image().flip(1)
    assert (ours - kiln(*apply(load(env, UNION), strength=scale, image=other))).abs().max() > 0.02  # so does the hint


def test_strength_zero_and_end_zero_are_no_controlnet_and_the_range_matters(env):
    cn, plain = load(env, UNION), kiln(*prompts())
    assert torch.equal(kiln(*apply(cn, strength=0.0)), plain)
    assert torch.equal(kiln(*apply(cn, end=0.0)), plain)
    full, late = kiln(*apply(cn)), kiln(*apply(cn, start=0.5))
    assert (late - plain).abs().max() > 0.005 and (late - full).abs().max() > 0.005


def test_both_sides_of_guidance_get_the_positive_prompts_samples(env, monkeypatch):
    """As the pipeline: the ControlNet runs with the prompt and its samples go to the negative pass
    too. Run on each side's own prompt (ComfyUI's rule) the image differs beyond the tolerance."""
    from nodes.families import qwen_image

    cn = load(env, UNION)
    ours = kiln(*apply(cn))
    monkeypatch.setattr(qwen_image.QwenImage, "controlnet_reads_positive_prompt", lambda self, config: False)
    own = kiln(*apply(cn))
    gap = float((ours - own).abs().max())
    print(f"each side's own prompt: {gap * 255:.3f}/255 off")
    assert gap > 2 / 255


# -- the Inpainting ControlNet ---------------------------------------------------------------------

def test_inpainting_equals_qwen_image_controlnet_inpaint_pipeline(env, monkeypatch):
    ours = kiln(*inpaint(load(env, INPAINT)))
    theirs = reference(monkeypatch, 1.0, inpainting=True)
    gap = float((ours - theirs).abs().max())
    print(f"controlnet inpaint: max diff {gap * 255:.4f}/255")
    assert gap <= PIXEL_TOL
    assert (ours - kiln(*prompts())).abs().max() > 0.02  # the ControlNet moves the image
    other = torch.zeros(1, SIZE, SIZE)
    other[:, 30:60, 2:30] = 1.0
    assert (ours - kiln(*inpaint(load(env, INPAINT), mask=other))).abs().max() > 0.02  # so does the mask


def test_the_latent_mask_follows_diffusers_nearest_not_comfyuis_nearest_exact(env, monkeypatch):
    from nodes.control import inpaint as inpaint_module

    ours = kiln(*inpaint(load(env, INPAINT)))
    real = inpaint_module.with_mask
    monkeypatch.setattr(inpaint_module, "with_mask", lambda link, hint, channels, method="": real(
        link, hint, channels, "nearest-exact"))
    comfy = kiln(*inpaint(load(env, INPAINT)))
    gap = float((ours - comfy).abs().max())
    print(f"ComfyUI's nearest-exact latent mask: {gap * 255:.3f}/255 off")
    assert gap > 2 / 255


# -- errors by name --------------------------------------------------------------------------------

def test_a_qwen_controlnet_on_flux_and_a_flux_controlnet_on_qwen_are_refused_by_name(env):
    from nodes import families
    from nodes.control.apply import ControlNetHandle, mismatch
    from test_flux_controlnet import tiny_controlnet as flux_controlnet

    qwen_cn = load(env, UNION)
    flux = families.by_name("flux")
    why = mismatch(qwen_cn, flux, {"num_attention_heads": 2})
    assert why and "qwen_image ControlNet" in why and "flux" in why
    net = flux_controlnet()
    flux_cn = ControlNetHandle(name="flux-cn", family=flux, config=dict(net.config),
                               _use=lambda: contextlib.nullcontext(net))
    with pytest.raises(NodeError) as err:
        kiln(*apply(flux_cn))
    assert err.value.input_name in ("positive", "negative")
    assert "flux ControlNet" in str(err.value) and "qwen_image" in str(err.value) and "flux-cn" in str(err.value)


def test_a_broken_qwen_controlnet_names_the_file(env):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_controlnet().state_dict().items() if not k.startswith("txt_in")}
    save_file(state, str(env.paths.models.root / "controlnet" / "broken-qwen.safetensors"))
    with pytest.raises(NodeError) as err:
        load(env, "broken-qwen.safetensors")
    assert err.value.input_name == "control_net_name" and "broken-qwen" in str(err.value)
    assert "Qwen-Image ControlNet" in str(err.value)
