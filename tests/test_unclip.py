"""CLIP ViT image encoders through CLIPVisionLoader / CLIPVisionEncode, and SD 2.1 unCLIP
(unCLIPCheckpointLoader, unCLIPConditioning) against diffusers' StableUnCLIPImg2ImgPipeline.

A tiny transformers ``CLIPVisionModelWithProjection`` (16 heads as every released tower has,
weights perturbed so nothing is at its initial value) is saved as ComfyUI keeps clip_vision
files (``vision_model.*`` + ``visual_projection.weight``) and, renamed by the test's own map, in
OpenCLIP's layout (``visual.*``, the layout unCLIP checkpoints carry); both load through the
real node. The picture is the encoder's own size, so transformers' CLIPImageProcessor and
ComfyUI's rule see the same pixels (their resampling differs otherwise).

The unCLIP checkpoint is the tiny SD 2.x (v) with a UNet class embedding for the image vector,
that tower under ``embedder.model.visual.`` and perturbed augmentor statistics, in one file.
StableUnCLIPImg2ImgPipeline starts from noise (the picture only gives the embedding), so the
Kiln side is ComfyUI's template: EmptyLatentImage -> KSampler at denoise 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from engine.context import NodeError
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from node_call import Called, call, environment_over
from nodes import style_model as sm
from nodes.vision_models import VisionOutput

PICTURE = 32
PATCH = 8
WIDTH = 64
PROJ = 48
LAYERS = 3
VISION, OPENCLIP = "tiny-clip-vit.safetensors", "tiny-clip-vit-openclip.safetensors"


def _clip_vit():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=16,
            image_size=PICTURE, patch_size=PATCH, projection_dim=PROJ, hidden_act="quick_gelu"))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _openclip_layout(state: dict) -> dict:
    """transformers' names -> OpenCLIP's visual tower (fused q/k/v, [width, dim] projection)."""
    top = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {"visual.proj": state["visual_projection.weight"].t().contiguous()}
    for i in range(LAYERS):
        base = f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{base}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, ours in block.items():
                out[f"visual.transformer.resblocks.{i}.{ours}.{kind}"] = state[f"{base}{theirs}.{kind}"]
    for theirs, ours in top.items():
        out["visual." + ours] = state["vision_model." + theirs]
    return out


@pytest.fixture(scope="module")
def vit():
    return _clip_vit()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, vit) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("unclip-models")
    (root / "clip_vision").mkdir()
    state = {k: v.contiguous() for k, v in vit.state_dict().items() if not k.endswith("position_ids")}
    assert "visual_projection.weight" in state and any(k.startswith("vision_model.") for k in state)
    save_file(state, str(root / "clip_vision" / VISION))
    save_file(_openclip_layout(state), str(root / "clip_vision" / OPENCLIP))
    return root


@pytest.fixture()
def env(models_root, tmp_path):
    yield from environment_over(models_root, tmp_path)


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (PICTURE, PICTURE, 3), dtype=np.uint8)


def _reference(vit, picture: np.ndarray):
    """transformers' encoder on transformers' own pixels."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": PICTURE}, crop_size={"height": PICTURE, "width": PICTURE})
    pixels = processor(images=Image.fromarray(picture), return_tensors="pt").pixel_values
    with torch.no_grad():
        return vit(pixel_values=pixels, output_hidden_states=True)


@pytest.mark.parametrize("name", [VISION, OPENCLIP])
def test_clip_vision_encode_equals_transformers(env, vit, name):
    record = Called()
    (vision,) = call(sm.clip_vision_loader, env, record, clip_name=name)
    assert any("CLIP ViT image encoder, 32 px" in m for m in record.messages), record.messages
    picture = _picture(0)
    image = torch.from_numpy(picture).float().div(255).unsqueeze(0)
    (out,) = call(sm.clip_vision_encode, env, clip_vision=vision, image=image, crop="center")
    assert isinstance(out, VisionOutput)
    ref = _reference(vit, picture)
    assert out.image_embeds.shape == (1, PROJ)
    assert out.last_hidden_state.shape == (1, (PICTURE // PATCH) ** 2 + 1, WIDTH)
    for ours, theirs in ((out.image_embeds, ref.image_embeds), (out.last_hidden_state, ref.last_hidden_state),
                         (out.penultimate_hidden_states, ref.hidden_states[-2])):
        assert (ours - theirs).abs().max() <= 1e-5
    assert (out["penultimate_hidden_states"] - out.last_hidden_state).abs().max() > 1e-2  # a different layer
    (other,) = call(sm.clip_vision_encode, env, clip_vision=vision,
                    image=torch.from_numpy(_picture(1)).float().div(255).unsqueeze(0), crop="center")
    assert (other.image_embeds - out.image_embeds).abs().max() > 1e-2


def test_the_activation_and_size_follow_the_shapes(env):
    (vision,) = call(sm.clip_vision_loader, env, clip_name=VISION)
    config = vision.loaded.model.config
    assert (config.hidden_act, config.image_size, config.patch_size, config.projection_dim) == \
        ("quick_gelu", PICTURE, PATCH, PROJ)
    assert vision.loaded.mean[0] == pytest.approx(0.48145466)


def test_an_incomplete_clip_vit_file_is_an_error_naming_the_input(env, models_root, vit):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in vit.state_dict().items() if k != "visual_projection.weight"}
    save_file(state, str(models_root / "clip_vision" / "no-proj.safetensors"))
    with pytest.raises(NodeError, match="visual_projection") as err:
        call(sm.clip_vision_loader, env, clip_name="no-proj.safetensors")
    assert err.value.input_name == "clip_name"
    # a whole CLIP model in the folder: its text side is left aside, the tower loads
    whole = dict(state, **{"visual_projection.weight": vit.state_dict()["visual_projection.weight"],
                           "text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
                           "logit_scale": torch.tensor(1.0)})
    save_file(whole, str(models_root / "clip_vision" / "whole-clip.safetensors"))
    (vision,) = call(sm.clip_vision_loader, env, clip_name="whole-clip.safetensors")
    assert vision.loaded.model.config.projection_dim == PROJ


# -- unCLIP: unCLIPCheckpointLoader + unCLIPConditioning against StableUnCLIPImg2ImgPipeline ----------

UNCLIP, PLAIN_SD2 = "tiny-sd21-unclip.safetensors", "tiny-sd2.safetensors"
PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"
SEED, STEPS, CFG, SIZE = 21, 6, 5.0, 64
AUGMENT = 0.3  # noise level round(999 * 0.3) = 300
PIXEL_TOL = 1 / 255 + 1e-6


def _unclip_parts() -> dict:
    """The tiny SD 2.x (v) parts with a UNet that takes an image embedding beside its noise level,
    and the augmentor's statistics (perturbed, so normalising is not the identity)."""
    from diffusers import UNet2DConditionModel

    parts = tiny_models.fresh_components("sd2-v")
    config = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        unet = UNet2DConditionModel(**dict(config, class_embed_type="projection",
                                           projection_class_embeddings_input_dim=2 * PROJ))
        with torch.no_grad():
            for name, p in unet.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if name.startswith("class_embedding") else 0.02))
        mean, std = torch.randn(PROJ) * 0.1, 1 + torch.rand(PROJ) * 0.5
    parts["unet"] = unet.eval()
    return dict(parts, mean=mean, std=std)


@pytest.fixture(scope="module")
def unclip_parts():
    return _unclip_parts()


@pytest.fixture(scope="module")
def unclip_root(models_root, unclip_parts, vit) -> Path:
    from safetensors.torch import save_file

    from nodes.checkpoint.to_original import components_to_original

    parts = {k: v for k, v in unclip_parts.items() if k not in ("mean", "std")}
    state = components_to_original(parts, "v_prediction")
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    vision = {k: v for k, v in vit.state_dict().items() if not k.endswith("position_ids")}
    state.update({"embedder.model." + k: v for k, v in _openclip_layout(vision).items()})
    state["noise_augmentor.data_mean"] = unclip_parts["mean"]
    state["noise_augmentor.data_std"] = unclip_parts["std"]
    (models_root / "checkpoints").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(models_root / "checkpoints" / UNCLIP))
    tiny_models.save_single_file("sd2", models_root / "checkpoints" / PLAIN_SD2)
    return models_root


@pytest.fixture()
def unclip_env(unclip_root, tmp_path):
    yield from environment_over(unclip_root, tmp_path)


def _graph(image: str, strength: float = 1.0, augment: float = AUGMENT, unclip: bool = True,
           ckpt: str = UNCLIP) -> dict:
    """ComfyUI's unCLIP template (API format) at the tests' size."""
    graph = {
        "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "5": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 3], "image": ["4", 0],
                                                           "crop": "center"}},
        "6": {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["2", 0], "clip_vision_output": ["5", 0],
                                                             "strength": strength, "noise_augmentation": augment}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": CFG,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0] if unclip else ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "unclip"}},
    }
    if not unclip:
        for node in ("4", "5", "6"):
            del graph[node]
    return graph


def _ok(env, graph: dict):
    outcome = Executor(default_registry(), env).run(parse(json.loads(json.dumps(graph))))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def _save_picture(env, seed: int, name: str) -> np.ndarray:
    from PIL import Image

    picture = _picture(seed)
    Image.fromarray(picture).save(env.paths.input.root / name)
    return picture


def _diffusers(unclip_parts, vit, picture: np.ndarray) -> torch.Tensor:
    """StableUnCLIPImg2ImgPipeline on the same parts, image embeds, noise level and seed; the
    augmentor's noise is the one ComfyUI's rule draws (seed - 10, on the CPU)."""
    import functools

    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=PROJ)
    with torch.no_grad():
        normalizer.mean.copy_(unclip_parts["mean"].reshape(1, -1))
        normalizer.std.copy_(unclip_parts["std"].reshape(1, -1))
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(), image_encoder=vit, image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        tokenizer=unclip_parts["tokenizer"], text_encoder=unclip_parts["text_encoder"], unet=unclip_parts["unet"],
        scheduler=EulerDiscreteScheduler.from_config(unclip_parts["scheduler"].config), vae=unclip_parts["vae"])
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, PROJ), generator=torch.Generator().manual_seed(SEED - 10))
    pipe.noise_image_embeddings = functools.partial(pipe.noise_image_embeddings, noise=noise)
    embeds = _reference(vit, picture).image_embeds
    with torch.no_grad():
        return pipe(image_embeds=embeds, prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, guidance_scale=CFG, noise_level=round(999 * AUGMENT),
                    generator=torch.Generator().manual_seed(SEED), output_type="pt").images.permute(0, 2, 3, 1)


def test_unclip_equals_stable_unclip_img2img_pipeline(unclip_env, unclip_parts, vit):
    picture = _save_picture(unclip_env, 0, "picture.png")
    outcome = _ok(unclip_env, _graph("picture.png"))
    assert isinstance(outcome.results["1"][3].loaded.image_size, int)
    ours = outcome.results["9"][0]
    theirs = _diffusers(unclip_parts, vit, picture)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    # not vacuous: the embedding moves the picture far beyond the agreement, and another picture too
    plain = _ok(unclip_env, _graph("picture.png", unclip=False)).results["9"][0]
    assert (plain - ours).abs().max() > 0.05
    _save_picture(unclip_env, 1, "other.png")
    other = _ok(unclip_env, _graph("other.png")).results["9"][0]
    assert (other - ours).abs().max() > 0.02


def test_strength_zero_equals_no_unclip_entry(unclip_env):
    _save_picture(unclip_env, 0, "picture.png")
    zero = _ok(unclip_env, _graph("picture.png", strength=0.0)).results["8"][0]["samples"]
    plain = _ok(unclip_env, _graph("picture.png", unclip=False)).results["8"][0]["samples"]
    assert torch.equal(zero, plain)


def test_chained_unclip_nodes_sum_their_embeddings(unclip_env):
    """Two unCLIPConditioning nodes append two records (ComfyUI's list); sampling sums them and
    re-noises the sum, which is not the single node's picture."""
    _save_picture(unclip_env, 0, "picture.png")
    graph = _graph("picture.png")
    graph["11"] = {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["6", 0], "clip_vision_output": ["5", 0],
                                                                  "strength": 0.5, "noise_augmentation": 0.1}}
    graph["8"]["inputs"]["positive"] = ["11", 0]
    outcome = _ok(unclip_env, graph)
    (entry,) = outcome.results["11"][0]
    assert [r["strength"] for r in entry[1]["unclip_conditioning"]] == [1.0, 0.5]
    single = _ok(unclip_env, _graph("picture.png")).results["8"][0]["samples"]
    assert (outcome.results["8"][0]["samples"] - single).abs().max() > 1e-3


def test_bad_inputs_are_errors_naming_the_input(unclip_env):
    from nodes import unclip_nodes
    from nodes.loaders import checkpoint_loader
    from nodes.sampling import ksampler

    siglip = VisionOutput(torch.zeros(1, 5, 8), torch.zeros(1, 5, 8), torch.zeros(1, 8), kind="SigLIP")
    cond = [[torch.zeros(1, 77, tiny_models.components("sd2")["text_encoder"].config.hidden_size), {}]]
    with pytest.raises(NodeError, match="CLIP ViT") as err:
        call(unclip_nodes.unclip_conditioning, unclip_env, conditioning=cond, clip_vision_output=siglip,
             strength=1.0, noise_augmentation=0.0)
    assert err.value.input_name == "clip_vision_output"
    with pytest.raises(NodeError, match="not an unCLIP") as err:
        call(unclip_nodes.unclip_checkpoint_loader, unclip_env, ckpt_name=PLAIN_SD2)
    assert err.value.input_name == "ckpt_name"
    # an unCLIP entry on a model without an image (ADM) input
    (vision,) = call(sm.clip_vision_loader, unclip_env, clip_name=VISION)
    (out,) = call(sm.clip_vision_encode, unclip_env, clip_vision=vision, image=torch.rand(1, PICTURE, PICTURE, 3),
                  crop="center")
    (unclipped,) = call(unclip_nodes.unclip_conditioning, unclip_env, conditioning=cond, clip_vision_output=out,
                        strength=1.0, noise_augmentation=0.0)
    model, _, _ = call(checkpoint_loader, unclip_env, ckpt_name=PLAIN_SD2)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    for positive, negative, name in ((unclipped, cond, "positive"), (cond, unclipped, "negative")):
        with pytest.raises(NodeError, match="no image \\(ADM\\) input") as err:
            call(ksampler, unclip_env, model=model, seed=1, steps=2, cfg=2.0, sampler_name="euler",
                 scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=1.0)
        assert err.value.input_name == name
    # the unCLIP model with an embedding of another width
    narrow = VisionOutput(torch.zeros(1, 5, 8), torch.zeros(1, 5, 8), torch.zeros(1, PROJ - 8), kind="CLIP ViT")
    (wrong,) = call(unclip_nodes.unclip_conditioning, unclip_env, conditioning=cond, clip_vision_output=narrow,
                    strength=1.0, noise_augmentation=0.0)
    model, _, _, _ = call(unclip_nodes.unclip_checkpoint_loader, unclip_env, ckpt_name=UNCLIP)
    with pytest.raises(NodeError, match=f"takes {PROJ}-wide") as err:
        call(ksampler, unclip_env, model=model, seed=1, steps=2, cfg=2.0, sampler_name="euler", scheduler="normal",
             positive=wrong, negative=cond, latent_image=latent, denoise=1.0)
    assert err.value.input_name == "positive"


def test_on_sdxl_the_embedding_replaces_the_pooled_text(unclip_env, unclip_root):
    """ComfyUI's SDXL Revision templates: an unCLIP record on an SDXL model becomes its pooled text,
    the embedding noised by the augmentor's cosine schedule (diffusers' DDPMScheduler here) with
    the seed - 10 noise, times strength; sampling then equals a conditioning holding that pooled text."""
    from diffusers import DDPMScheduler

    from nodes import unclip_nodes
    from nodes.loaders import checkpoint_loader
    from nodes.sampling import ksampler
    from nodes.text import clip_text_encode

    tiny_models.save_single_file("sdxl", unclip_root / "checkpoints" / "tiny-sdxl.safetensors")
    model, clip, _ = call(checkpoint_loader, unclip_env, ckpt_name="tiny-sdxl.safetensors")
    (positive,) = call(clip_text_encode, unclip_env, text=PROMPT, clip=clip)
    (negative,) = call(clip_text_encode, unclip_env, text=NEGATIVE, clip=clip)
    width = positive[0][1]["pooled_output"].shape[-1]
    embeds = torch.randn(1, width, generator=torch.Generator().manual_seed(5)) * 2
    image = VisionOutput(torch.zeros(1, 5, 8), torch.zeros(1, 5, 8), embeds, kind="CLIP ViT")
    (revised,) = call(unclip_nodes.unclip_conditioning, unclip_env, conditioning=positive, clip_vision_output=image,
                      strength=0.7, noise_augmentation=0.2)
    noise = torch.randn((1, width), generator=torch.Generator().manual_seed(SEED - 10))
    pooled = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").add_noise(
        embeds, noise, torch.tensor([round(999 * 0.2)])) * 0.7
    by_hand = [[positive[0][0], {**positive[0][1], "pooled_output": pooled}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def sample(pos):
        return call(ksampler, unclip_env, model=model, seed=SEED, steps=3, cfg=4.0, sampler_name="euler",
                    scheduler="normal", positive=pos, negative=negative, latent_image=latent, denoise=1.0)[0]["samples"]

    from nodes import unclip

    prepared = unclip.prepare(model, revised, negative, [SEED])[0][0][1]["pooled_output"]
    assert (prepared - pooled).abs().max() <= 1e-5 and (pooled - embeds * 0.7).abs().max() > 0.1
    ours, expected, plain = sample(revised), sample(by_hand), sample(positive)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-4)  # raw latents are tens in size
    assert (ours - plain).abs().max() > 1e-2


@pytest.mark.parametrize("width,layers,mlp,proj,act", [(1024, 24, 4096, 768, "quick_gelu"),  # OpenAI ViT-L/14
                                                        (1280, 32, 5120, 1024, "gelu"),  # OpenCLIP ViT-H/14
                                                        (1664, 48, 8192, 1280, "gelu")])  # OpenCLIP ViT-bigG/14
def test_released_towers_get_comfyuis_configs(width, layers, mlp, proj, act):
    """The released sizes, from shapes alone (no weights): ComfyUI's clip_vision_config_vitl/h/g."""
    from nodes.clip_vit import openclip_to_transformers, vision_config

    class Shape:  # a tensor's shape, enough for the layout map (no memory)
        def __init__(self, *shape):
            self.shape = shape

        def t(self):
            return Shape(*reversed(self.shape))

        def contiguous(self):
            return self

        def chunk(self, n, dim=0):
            return [Shape(self.shape[0] // n, *self.shape[1:]) for _ in range(n)]

    state = {"visual.class_embedding": Shape(width), "visual.positional_embedding": Shape(257, width),
             "visual.conv1.weight": Shape(width, 3, 14, 14), "visual.proj": Shape(width, proj)}
    for i in range(layers):
        state[f"visual.transformer.resblocks.{i}.ln_1.weight"] = Shape(width)
        state[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"] = Shape(3 * width, width)
        state[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = Shape(mlp, width)
    shapes = {k: v.shape for k, v in openclip_to_transformers(state, "visual.").items()}
    assert shapes["vision_model.encoder.layers.0.self_attn.q_proj.weight"] == (width, width)
    config = vision_config(shapes, "tower")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.projection_dim,
            config.hidden_act, config.image_size, config.patch_size, config.num_attention_heads) == \
        (width, layers, mlp, proj, act, 224, 14, 16)


@pytest.mark.parametrize("adm", [1536, 2048])  # sd21-unclip-l, sd21-unclip-h
def test_a_released_unclip_unet_is_detected_from_its_shapes(adm):
    """SD 2.1 unCLIP's full-size UNet, built on the meta device and named as in the file: the
    unCLIP family claims it and its class embedding takes the image vector's width."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from nodes.checkpoint.detect import family_of, unet_config
    from nodes.checkpoint.to_original import unet_to_original
    from nodes.families import sd2_unclip

    family = sd2_unclip.FAMILY
    config = dict(family.unet_defaults(), in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, use_linear_projection=True,
                  attention_head_dim=(5, 10, 20, 20), projection_class_embeddings_input_dim=adm)
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    shapes = {k: tuple(v.shape) for k, v in unet_to_original(unet.state_dict(), dict(unet.config)).items()}
    shapes["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
    assert family_of(shapes) is family  # before SD 2.x, whose text keys it shares
    found = unet_config(shapes, family)
    assert (found["class_embed_type"], found["projection_class_embeddings_input_dim"]) == ("projection", adm)
    assert found["block_out_channels"] == (320, 640, 1280, 1280) and found["cross_attention_dim"] == 1024
