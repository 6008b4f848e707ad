"""AliMama's inpainting ControlNets (a mask channel on the hint) through ComfyUI's
ControlNetInpaintingAliMamaApply: SD3's against diffusers' StableDiffusion3ControlNetInpaintingPipeline
on the tiny SD3.5; FLUX's (which no diffusers pipeline runs: its hint embedder is wider than
FluxControlNetModel's) against diffusers' FluxControlNetImg2ImgPipeline given the hint AliMama's own
pipeline builds (the masked image's latent and the kept mask, packed together), made by hand here;
ComfyUI's rules for masks and for other apply nodes, and the errors.

Parity convention as tests/test_sd3_controlnet.py: the pipeline's VAE posterior sample is replaced
by its mean (ComfyUI and Kiln encode the mean); the mask's edges lie on the latent grid, where
diffusers' nearest and ComfyUI's nearest-exact resize agree, and it is binary, where diffusers'
binarising changes nothing.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models
import tiny_sd3
from engine.context import NodeError
from node_call import call, environment_over
from nodes import loaders, sampling, text
from nodes.controlnet import controlnet_apply_advanced, controlnet_inpainting_alimama_apply, controlnet_loader
from nodes.flux_nodes import empty_sd3_latent_image

PIXEL_TOL = 1 / 255 + 1e-6
SIZE, STEPS, CFG, SEED = 64, 4, 4.5, 5
PROMPT, NEGATIVE = "a red barn in a field", "blurry, dark"
CKPT, CN, CN_FOLDER = "tiny-sd3-large.safetensors", "tiny-sd3-alimama.safetensors", "tiny-sd3-alimama-folder"
PLAIN = "tiny-sd3-instantx.safetensors"


def tiny_sd3_inpaint_controlnet(seed: int = 13):
    """AliMama's SD3 inpainting ControlNet shape (a prompt embedder, 16 + 1 hint channels), one block
    for the tiny SD3.5, every weight moved off its initial value (the zero-initialised hint
    embedder and output layers strongly)."""
    from diffusers import SD3ControlNetModel

    width = tiny_sd3.HEADS * tiny_sd3.HEAD_DIM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1,
                                 attention_head_dim=tiny_sd3.HEAD_DIM, num_attention_heads=tiny_sd3.HEADS,
                                 joint_attention_dim=tiny_sd3.T5, caption_projection_dim=width,
                                 pooled_projection_dim=tiny_sd3.CLIP_L + tiny_sd3.CLIP_G, out_channels=16,
                                 pos_embed_max_size=16, qk_norm="rms_norm", extra_conditioning_channels=1)
        with torch.no_grad():
            for name, p in net.named_parameters():
                strong = name.startswith(("controlnet_blocks", "pos_embed_input"))
                p.add_(torch.randn_like(p) * (0.3 if strong else 0.02))
    return net.eval()


def photo() -> torch.Tensor:
    """IMAGE [1, 64, 64, 3]: smooth colour ramps and a bright square (so blacking out an area shows)."""
    ramp = torch.linspace(0.1, 0.9, SIZE)
    img = torch.stack([ramp[None, :].expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE),
                       torch.full((SIZE, SIZE), 0.5)], dim=-1)[None].clone()
    img[:, 20:36, 28:44] = 1.0
    return img


def mask(top: int = 16, left: int = 24, size: int = 24) -> torch.Tensor:
    """MASK [1, 64, 64]: 1 over a square whose edges lie on the 8-pixel latent grid."""
    m = torch.zeros(1, SIZE, SIZE)
    m[:, top:top + size, left:left + size] = 1.0
    return m


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("alimama")
    models = root / "models"
    tiny_sd3._save(models / "checkpoints" / CKPT, tiny_sd3.single_file("large"))
    (models / "controlnet").mkdir(parents=True)
    net = tiny_sd3_inpaint_controlnet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(models / "controlnet" / CN))
    net.save_pretrained(str(models / "controlnet" / CN_FOLDER), safe_serialization=True)
    from test_sd3_controlnet import tiny_controlnet

    plain = tiny_controlnet().state_dict()
    save_file({k: v.contiguous() for k, v in plain.items()}, str(models / "controlnet" / PLAIN))
    yield from environment_over(models, root)


def load(env, name: str = CN):
    return call(controlnet_loader, env, control_net_name=name)[0]


def sd3(env, apply=None) -> torch.Tensor:
    """The tiny SD3.5's txt2img image, its conditioning passed through ``apply(pos, neg, vae)``."""
    model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=CKPT)
    pos = call(text.clip_text_encode, env, text=PROMPT, clip=clip)[0]
    neg = call(text.clip_text_encode, env, text=NEGATIVE, clip=clip)[0]
    if apply is not None:
        pos, neg = apply(pos, neg, vae)
    (latent,) = call(empty_sd3_latent_image, env, width=SIZE, height=SIZE, batch_size=1)
    (out,) = call(sampling.ksampler, env, model=model, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=latent)
    with vae.module() as v:
        return tiny_models.decode(v, out["samples"])


def alimama(env, m=None, strength: float = 0.8, cn=None, image=None):
    def apply(pos, neg, vae):
        return call(controlnet_inpainting_alimama_apply, env, positive=pos, negative=neg, control_net=cn or load(env),
                    vae=vae, image=photo() if image is None else image, mask=mask() if m is None else m,
                    strength=strength, start_percent=0.0, end_percent=1.0)
    return apply


def reference(monkeypatch, m: torch.Tensor, strength: float = 0.8) -> torch.Tensor:
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline
    from diffusers.models.autoencoders import vae as vae_module
    from PIL import Image

    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe = StableDiffusion3ControlNetInpaintingPipeline(**dict(tiny_sd3.components("large")),
                                                        controlnet=tiny_sd3_inpaint_controlnet())
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((photo()[0].numpy() * 255).round().astype("uint8"))
    control_mask = Image.fromarray((m[0].numpy() * 255).astype("uint8"), mode="L")
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, control_image=image, control_mask=control_mask,
                   controlnet_conditioning_scale=strength, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="pt").images
    return out.permute(0, 2, 3, 1)


# -- SD3 ---------------------------------------------------------------------------------------------

def test_sd3_file_and_folder_load_as_an_inpainting_controlnet(env):
    want = tiny_sd3_inpaint_controlnet().state_dict()
    for name in (CN, CN_FOLDER):
        handle = load(env, name)
        assert handle.family.name == "sd3" and handle.config["extra_conditioning_channels"] == 1
        with handle.use() as net:
            got = net.state_dict()
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_sd3_inpainting_equals_the_diffusers_pipeline_and_the_mask_matters(env, monkeypatch):
    # the photo goes to both through 8 bits, as the pipeline reads a PIL image
    ours = sd3(env, alimama(env, image=(photo() * 255).round() / 255))
    theirs = reference(monkeypatch, mask())
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
    other = sd3(env, alimama(env, m=mask(top=32, left=0, size=32)))
    assert (ours - other).abs().max().item() > 0.02  # where the mask is changes the image
    plain = sd3(env)
    assert (ours - plain).abs().max().item() > 0.02  # and the ControlNet acts at all
    assert torch.equal(sd3(env, alimama(env, strength=0.0)), plain)


def test_comfyui_api_graph_runs_unchanged(env, monkeypatch):
    from PIL import Image

    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse

    Image.fromarray((photo()[0].numpy() * 255).round().astype("uint8")).save(env.paths.input.root / "photo.png")
    Image.fromarray((mask()[0].numpy() * 255).astype("uint8"), mode="L").save(env.paths.input.root / "mask.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "11": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "5": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CN}},
        "6": {"class_type": "ControlNetInpaintingAliMamaApply", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["5", 0], "vae": ["1", 2], "image": ["4", 0],
            "mask": ["11", 0], "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": CFG,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["6", 1],
                                                   "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "alimama"}},
    }
    outcome = Executor(default_registry(), env).run(parse(graph))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    assert (outcome.results["9"][0] - reference(monkeypatch, mask())).abs().max().item() <= PIXEL_TOL


def test_controlnet_apply_advanced_runs_an_inpainting_controlnet_with_nothing_masked(env):
    """ComfyUI lets ControlNetApplyAdvanced apply an inpainting ControlNet: the mask channel is all
    ones (keep everything), which is the AliMama node with an empty mask."""
    cn = load(env)

    def advanced(pos, neg, vae):
        return call(controlnet_apply_advanced, env, positive=pos, negative=neg, control_net=cn, image=photo(),
                    strength=0.8, start_percent=0.0, end_percent=1.0, vae=vae)

    via_advanced = sd3(env, advanced)
    empty = sd3(env, alimama(env, m=torch.zeros(1, SIZE, SIZE), cn=cn))
    assert (via_advanced - empty).abs().max().item() <= 1e-6
    assert (via_advanced - sd3(env, alimama(env, cn=cn))).abs().max().item() > 0.02


def test_an_ordinary_controlnet_through_the_alimama_node_is_applied_as_by_the_advanced_node(env):
    """ComfyUI masks nothing for a ControlNet without a mask channel: the image is its hint as given."""
    cn = load(env, PLAIN)

    def advanced(pos, neg, vae):
        return call(controlnet_apply_advanced, env, positive=pos, negative=neg, control_net=cn, image=photo(),
                    strength=0.8, start_percent=0.0, end_percent=1.0, vae=vae)

    via_alimama = sd3(env, alimama(env, cn=cn))
    assert torch.equal(via_alimama, sd3(env, advanced))
    assert (via_alimama - sd3(env)).abs().max().item() > 0.02


def test_masked_image_follows_comfyui(env):
    from nodes.control.inpaint import masked_image

    small = torch.zeros(1, 8, 8)
    small[:, 2:4, 4:8] = 1.0  # at an eighth of the image's size: bilinear up, rounded
    image, kept = masked_image(photo(), small)
    assert kept.shape == (1, 1, 8, 8) and torch.equal(kept[0, 0], 1 - small[0])
    black = (image == 0).all(dim=-1)[0]
    # the upscaled square, blacked out where the bilinear mask rounds to 1: its corners, where the
    # mask is the product of two edge ramps, round off (3 pixels each)
    assert black[16:32, 35:61].all() and black[19:29, 32:64].all()
    assert not black[:16].any() and not black[32:].any() and not black[:, :32].any()
    assert black.sum().item() == 16 * 32 - 4 * 3


# -- errors ------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_input(env):
    cn = load(env)
    with pytest.raises(NodeError) as err:
        sd3(env, lambda pos, neg, vae: call(controlnet_inpainting_alimama_apply, env, positive=pos, negative=neg,
                                            control_net=cn, vae=vae, image=photo(), mask=None, strength=1.0,
                                            start_percent=0.0, end_percent=1.0))
    assert err.value.input_name == "mask"
    with pytest.raises(NodeError) as err:
        alimama(env, m=torch.zeros(2, 3, SIZE, SIZE), cn=cn)([], [], None)
    assert err.value.input_name == "mask"
    with pytest.raises(NodeError) as err:
        alimama(env, m=torch.zeros(3, SIZE, SIZE), cn=cn, image=photo().repeat(2, 1, 1, 1))([], [], None)
    assert err.value.input_name == "mask"
    with pytest.raises(NodeError) as err:
        alimama(env, cn=cn)([], [], None)  # no vae
    assert err.value.input_name == "vae"
    from nodes.controlnet import controlnet_apply

    with pytest.raises(NodeError) as err:  # the old node has no vae input for the image's latent
        call(controlnet_apply, env, conditioning=[], control_net=cn, image=photo(), strength=1.0)
    assert err.value.input_name == "control_net" and "vae" in str(err.value)


def test_an_inpainting_controlnet_on_another_family_is_refused_naming_it(env):
    from nodes.latent import add_noise
    from test_sampling import Tiny
    from test_sd3_controlnet import _ctx, _sdxl_like_vae

    sdxl = Tiny("sdxl")
    pos, neg = call(controlnet_inpainting_alimama_apply, None, positive=sdxl.pos, negative=sdxl.neg,
                    control_net=load(env), vae=_sdxl_like_vae(), image=photo(), mask=mask(), strength=1.0,
                    start_percent=0.0, end_percent=1.0)
    (lat,) = add_noise(_ctx(), sdxl.model, {"samples": sdxl.init}, 0.7, 1)
    with pytest.raises(NodeError) as err:
        sampling.ksampler(_ctx(), sdxl.model, 1, 2, 5.0, "euler", "normal", pos, neg, lat)
    assert err.value.input_name in ("positive", "negative")
    assert "sd3 ControlNet" in str(err.value) and "sdxl" in str(err.value) and CN in str(err.value)


# -- FLUX ----------------------------------------------------------------------------------------------

FLUX_CN, FLUX_FOLDER = "tiny-flux-alimama.safetensors", "tiny-flux-alimama-folder"


def tiny_flux_inpaint_controlnet(seed: int = 17):
    """AliMama's FLUX inpainting ControlNet shape: test_flux_controlnet's tiny ControlNet with a hint
    embedder 4 inputs wider (the mask channel in 2x2 patches), perturbed as its other zero layers."""
    import copy

    from test_flux_controlnet import tiny_controlnet

    wide = copy.deepcopy(tiny_controlnet(seed=seed))  # that one is cached and shared
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        wide.controlnet_x_embedder = torch.nn.Linear(64 + 4, wide.controlnet_x_embedder.out_features)
        with torch.no_grad():
            wide.controlnet_x_embedder.weight.mul_(3.0)
    return wide.eval()


@pytest.fixture(scope="module")
def flux_env(tmp_path_factory):
    import tiny_flux
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("alimama-flux")
    models = tiny_flux.make_models_folder(root / "models")
    (models / "controlnet").mkdir()
    net = tiny_flux_inpaint_controlnet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(models / "controlnet" / FLUX_CN))
    net.save_pretrained(str(models / "controlnet" / FLUX_FOLDER), safe_serialization=True)
    yield from environment_over(models, root)


def flux_apply(cn, m=None, strength: float = 0.8, node=controlnet_inpainting_alimama_apply):
    from test_flux_controlnet import conditioning, vae

    cond = conditioning()
    extra = {"mask": mask() if m is None else m} if node is controlnet_inpainting_alimama_apply else {}
    return call(node, None, positive=cond, negative=cond, control_net=cn, image=photo(), strength=strength,
                start_percent=0.0, end_percent=1.0, vae=vae(), **extra)


def flux_reference(monkeypatch, m: torch.Tensor, scale: float = 0.8) -> torch.Tensor:
    """FluxControlNetImg2ImgPipeline with AliMama's hint: the image with the masked pixels at -1,
    VAE-encoded (the posterior mean), shifted and scaled, and 1 - the mask (nearest) appended
    before packing (the pipeline's own encode and pack, taught the extra channel)."""
    import tiny_flux
    from diffusers import FluxControlNetImg2ImgPipeline
    from diffusers.pipelines.flux import pipeline_flux_controlnet_image_to_image as module
    from test_flux import _embeds
    from test_flux_controlnet import GUIDANCE, SEED, STEPS, STRENGTH, init_image

    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode())
    pipe = FluxControlNetImg2ImgPipeline(**dict(tiny_flux.components("dev")), controlnet=tiny_flux_inpaint_controlnet())
    pipe.set_progress_bar_config(disable=True)
    kept = 1 - torch.nn.functional.interpolate(m[:, None], size=(SIZE // 8, SIZE // 8))
    packs = []

    def pack(latents, batch, channels, height, width):
        if not packs:  # the pipeline packs the control latent first, then the noise
            latents = torch.cat([latents, kept.to(latents)], dim=1)
        packs.append(latents.shape[1])
        return FluxControlNetImg2ImgPipeline._pack_latents(latents, batch, latents.shape[1], height, width)

    pipe._pack_latents = pack
    masked = photo().movedim(-1, 1) * 2 - 1
    masked[(m[:, None] > 0.5).repeat(1, 3, 1, 1)] = -1
    embeds, pooled = _embeds("dev")
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, image=init_image().movedim(-1, 1),
                   control_image=masked, strength=STRENGTH, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, controlnet_conditioning_scale=scale,
                   generator=torch.Generator().manual_seed(SEED), output_type="pt").images
    assert packs == [17, 16]
    return out.permute(0, 2, 3, 1)


def test_flux_file_and_folder_load_as_an_inpainting_controlnet(flux_env):
    from node_call import Called
    from nodes.control.inpaint import FLUX_EXTRA

    want = tiny_flux_inpaint_controlnet().state_dict()
    for name in (FLUX_CN, FLUX_FOLDER):
        rec = Called()
        (handle,) = call(controlnet_loader, flux_env, rec, control_net_name=name)
        assert handle.family.name == "flux" and handle.config[FLUX_EXTRA] == 1 and "AliMama" in rec.messages[0]
        with handle.use() as net:
            got = net.state_dict()
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_flux_inpainting_equals_the_pipeline_with_alimamas_hint_and_the_mask_matters(flux_env, monkeypatch):
    from test_flux_controlnet import conditioning, kiln as flux_kiln

    cn = load(flux_env, FLUX_CN)
    ours = flux_kiln(*flux_apply(cn))
    theirs = flux_reference(monkeypatch, mask())
    assert (ours - theirs).abs().max().item() <= PIXEL_TOL
    other = flux_kiln(*flux_apply(cn, m=mask(top=32, left=0, size=32)))
    assert (ours - other).abs().max().item() > 0.02
    plain = flux_kiln(conditioning())
    assert (ours - plain).abs().max().item() > 0.02
    assert torch.equal(flux_kiln(*flux_apply(cn, strength=0.0)), plain)
    # ControlNetApplyAdvanced: the same ControlNet, nothing masked
    assert (flux_kiln(*flux_apply(cn, node=controlnet_apply_advanced))
            - flux_kiln(*flux_apply(cn, m=torch.zeros(1, SIZE, SIZE)))).abs().max().item() <= 1e-6


def test_flux_inpainting_controlnet_on_another_family_is_refused(flux_env):
    from nodes import families
    from nodes.control.apply import mismatch

    cn = load(flux_env, FLUX_CN)
    assert "flux ControlNet" in mismatch(cn, families.by_name("sd3"), None)
    assert mismatch(cn, families.by_name("flux-schnell"), None) is None
