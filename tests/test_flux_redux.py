"""FLUX.1 Redux on the tiny FLUX: CLIPVisionLoader/Encode and StyleModelLoader/Apply against
diffusers' FluxPriorReduxPipeline + FluxPipeline.

A tiny SigLIP vision tower (transformers' SiglipVisionModel, 16 heads as every released one
has) and a tiny Redux projector (diffusers' ReduxImageEncoder) are saved as ComfyUI keeps
them (models/clip_vision, models/style_models) and loaded through the real nodes. The
picture is the encoder's own size, so both sides see the same pixels (PIL and ComfyUI's
resampling differ otherwise). ``attn_bias`` at strength 0 must equal no Redux at all (the
mask hides the image tokens from every other token): that identity checks the mask's
orientation, which no formula in the test could.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux
from engine.context import NodeError
from engine.executor import Executor
from engine.workflow import parse
from flow_family_files import env, registry  # noqa: F401 (fixtures)
from node_call import call
from nodes import style_model as sm
from nodes.families import flux
from nodes.vision_models import preprocess

PROMPT = "a lighthouse on a cliff"
PICTURE = 32  # the tiny SigLIP's image size
SIZE = 64
SPLIT = dict(unet="tiny-flux-dev.safetensors", clip_l="tiny-clip_l.safetensors", t5="tiny-t5xxl.safetensors",
             vae="tiny-flux-ae.safetensors")
VISION, REDUX = "tiny-sigclip.safetensors", "tiny-redux.safetensors"
EFFECT = 1e-3


def _siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=16, image_size=PICTURE, patch_size=4,
                                                     hidden_act="gelu_pytorch_tanh"))
    return model.eval()


def _redux():
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = ReduxImageEncoder(redux_dim=64, txt_in_features=tiny_flux.TEXT)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4.0)  # tokens about as large as T5's, so they matter in the tiny model
    return model.eval()


@pytest.fixture(scope="module")
def parts():
    return {"vision": _siglip(), "redux": _redux()}


def _comfy_layout(module) -> dict:
    """A transformers vision tower's weights under ``vision_model.``, as ComfyUI's clip_vision files
    name them (transformers 5 leaves the prefix off the module's own names)."""
    return {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory, parts) -> Path:
    from safetensors.torch import save_file

    root = tiny_flux.make_models_folder(tmp_path_factory.mktemp("redux-models"))
    for folder, name, state in (("clip_vision", VISION, _comfy_layout(parts["vision"])),
                                ("style_models", REDUX, parts["redux"].state_dict())):
        (root / folder).mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / folder / name))
    return root


def _picture(seed: int = 0, size: tuple[int, int] = (PICTURE, PICTURE)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _graph(image: str, strength: float = 1.0, strength_type: str = "multiply", cfg: float = 1.0,
           redux: bool = True) -> dict:
    """ComfyUI's Redux template graph (API format) at the tests' size."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": SPLIT["clip_l"], "clip_name2": SPLIT["t5"],
                                                         "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION}},
        "7": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["6", 0], "image": ["5", 0],
                                                           "crop": "center"}},
        "8": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": REDUX}},
        "9": {"class_type": "StyleModelApply", "inputs": {"conditioning": ["4", 0], "style_model": ["8", 0],
                                                          "clip_vision_output": ["7", 0], "strength": strength,
                                                          "strength_type": strength_type}},
        "10": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["9", 0] if redux else ["4", 0],
                                                        "guidance": 3.5}},
        "11": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 4, "cfg": cfg,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["10", 0], "negative": ["4", 0],
                                                    "latent_image": ["11", 0], "denoise": 1.0}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "redux"}},
    }
    if not redux:
        for node in ("6", "7", "8", "9"):
            del graph[node]
    return graph


def run(registry, env, graph: dict):
    outcome = Executor(registry, env).run(parse(json.loads(json.dumps(graph))))
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome


def _prior(parts, picture):
    from diffusers import FluxPriorReduxPipeline
    from transformers import SiglipImageProcessor

    flux_parts = tiny_flux.components("dev")
    processor = SiglipImageProcessor(size={"height": PICTURE, "width": PICTURE}, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)
    prior = FluxPriorReduxPipeline(image_encoder=parts["vision"], feature_extractor=processor,
                                   image_embedder=parts["redux"], text_encoder=flux_parts["text_encoder"],
                                   tokenizer=flux_parts["tokenizer"], text_encoder_2=flux_parts["text_encoder_2"],
                                   tokenizer_2=flux_parts["tokenizer_2"])
    with torch.no_grad():
        return prior(image=picture, prompt=PROMPT, return_dict=False)


def test_redux_equals_flux_prior_redux_pipeline(registry, env, parts):
    picture = _picture()
    picture.save(env.paths.input.root / "picture.png")
    outcome = run(registry, env, _graph("picture.png"))
    embeds, pooled = _prior(parts, picture)
    (cond,) = outcome.results["9"]
    assert cond[0][0].shape == embeds.shape == (1, 512 + (PICTURE // 4) ** 2, tiny_flux.TEXT)
    assert (cond[0][0] - embeds).abs().max() <= 1e-5
    with torch.no_grad():
        theirs = tiny_flux.pipeline("dev")(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE,
                                            num_inference_steps=4, guidance_scale=3.5, output_type="np",
                                            generator=torch.Generator().manual_seed(3)).images
    assert np.abs(outcome.results["13"][0].numpy() - theirs).max() <= 1 / 255 + 1e-6
    # the picture matters, in the latent far beyond the agreement (not vacuous)
    plain = run(registry, env, _graph("picture.png", redux=False)).results["12"][0]["samples"]
    assert (outcome.results["12"][0]["samples"] - plain).abs().max() > EFFECT
    _picture(1).save(env.paths.input.root / "other.png")
    other = run(registry, env, _graph("other.png")).results["12"][0]["samples"]
    assert (outcome.results["12"][0]["samples"] - other).abs().max() > EFFECT


def test_strength_multiply_scales_the_image_tokens(registry, env):
    _picture().save(env.paths.input.root / "picture.png")
    full = run(registry, env, _graph("picture.png")).results["9"][0][0][0]
    half = run(registry, env, _graph("picture.png", strength=0.5)).results["9"][0][0][0]
    assert torch.equal(full[:, :512], half[:, :512])  # the prompt's own tokens are untouched
    assert torch.allclose(full[:, 512:] * 0.5, half[:, 512:], atol=1e-6)
    assert full[:, 512:].abs().max() > 0.1


def test_attn_bias_at_zero_hides_the_image_and_at_one_is_plain(registry, env):
    _picture().save(env.paths.input.root / "picture.png")

    def latent(**kw):
        return run(registry, env, _graph("picture.png", **kw)).results["12"][0]["samples"]

    plain, redux = latent(redux=False), latent()
    assert (latent(strength_type="attn_bias", strength=0.0) - plain).abs().max() <= 1e-5
    assert torch.equal(latent(strength_type="attn_bias", strength=1.0), redux)  # log 1 = 0: no bias at all
    between = latent(strength_type="attn_bias", strength=0.3)
    assert (between - plain).abs().max() > EFFECT and (between - redux).abs().max() > EFFECT


def test_a_negative_without_redux_tokens_is_evaluated_apart(registry, env, monkeypatch):
    """512 and 528 tokens would repeat to 16,896 to share a batch; they are evaluated in two calls
    (ComfyUI repeats a prompt at most 4 times), and guidance still reads both."""
    _picture().save(env.paths.input.root / "picture.png")
    lengths = []
    original = flux.FluxNetwork.__call__

    def spy(self, x, t, encoder_hidden_states, *args, **kwargs):
        lengths.append(encoder_hidden_states.shape[1])
        return original(self, x, t, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(flux.FluxNetwork, "__call__", spy)
    guided = run(registry, env, _graph("picture.png", cfg=2.0)).results["12"][0]["samples"]
    assert sorted(lengths[:2]) == [512, 512 + 64]
    assert (guided - run(registry, env, _graph("picture.png")).results["12"][0]["samples"]).abs().max() > EFFECT


def test_a_batch_of_pictures_appends_one_run_of_tokens_per_picture(registry, env, parts):
    import nodes.vision_models as vm

    (vision,) = call(sm.clip_vision_loader, env, clip_name=VISION)
    (style,) = call(sm.style_model_loader, env, style_model_name=REDUX)
    pictures = torch.stack([torch.from_numpy(np.array(_picture(s))).float() / 255 for s in (0, 1)])
    (out,) = call(sm.clip_vision_encode, env, clip_vision=vision, image=pictures, crop="center")
    assert isinstance(out, vm.VisionOutput) and out.last_hidden_state.shape == (2, 64, 64)
    with torch.no_grad():
        expected = parts["vision"](pixel_values=(pictures.movedim(-1, 1) - 0.5) / 0.5).last_hidden_state
    assert (out.last_hidden_state - expected).abs().max() <= 1e-5
    cond = [[torch.zeros(1, 512, tiny_flux.TEXT), {"pooled_output": torch.zeros(1, tiny_flux.TEXT)}]]
    (applied,) = call(sm.style_model_apply, env, conditioning=cond, style_model=style, clip_vision_output=out,
                      strength=1.0, strength_type="multiply")
    assert applied[0][0].shape == (1, 512 + 2 * 64, tiny_flux.TEXT)
    assert "attention_bias" not in applied[0][1] and cond[0][0].shape[1] == 512  # the input is unchanged


def test_center_crop_cuts_the_sides_and_none_squashes():
    """A 64x32 picture, grey in its middle half and white at the sides: the centre crop sees only
    grey, the squash sees the sides too; a picture of the encoder's size is only normalised."""
    grey = 128 / 255
    image = torch.full((1, 32, 64, 3), grey)
    image[:, :, :16] = image[:, :, 48:] = 1.0
    crop = preprocess(image, 32, (0.5,) * 3, (0.5,) * 3, crop=True)
    squash = preprocess(image, 32, (0.5,) * 3, (0.5,) * 3, crop=False)
    assert crop.shape == squash.shape == (1, 3, 32, 32)
    assert (crop - (grey - 0.5) / 0.5).abs().max() <= 1e-6  # all grey
    assert squash.max() > 0.9
    exact = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    exact = (exact * 255).round() / 255
    assert torch.allclose(preprocess(exact, 32, (0.5,) * 3, (0.5,) * 3, crop=True), (exact.movedim(-1, 1) - 0.5) / 0.5)


def test_wrong_files_and_inputs_are_errors_naming_the_input(registry, env, root, parts):
    from safetensors.torch import save_file

    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8))
    save_file({k: v.contiguous() for k, v in _comfy_layout(clip).items()}, str(root / "clip_vision" / "vit.safetensors"))
    save_file({"style_embedding": torch.zeros(1, 8, 768)}, str(root / "style_models" / "t2i.safetensors"))
    with pytest.raises(NodeError, match="CLIP ViT") as err:
        call(sm.clip_vision_loader, env, clip_name="vit.safetensors")
    assert err.value.input_name == "clip_name"
    with pytest.raises(NodeError, match="T2I-Adapter") as err:
        call(sm.style_model_loader, env, style_model_name="t2i.safetensors")
    assert err.value.input_name == "style_model_name"
    (vision,) = call(sm.clip_vision_loader, env, clip_name=VISION)
    (style,) = call(sm.style_model_loader, env, style_model_name=REDUX)
    (out,) = call(sm.clip_vision_encode, env, clip_vision=vision, image=torch.rand(1, 32, 32, 3), crop="center")
    sd_cond = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(NodeError, match="FLUX prompt") as err:
        call(sm.style_model_apply, env, conditioning=sd_cond, style_model=style, clip_vision_output=out,
             strength=1.0, strength_type="multiply")
    assert err.value.input_name == "conditioning"
    with pytest.raises(NodeError) as err:
        call(sm.style_model_apply, env, conditioning=sd_cond, style_model=vision, clip_vision_output=out,
             strength=1.0, strength_type="multiply")
    assert err.value.input_name == "style_model"
    with pytest.raises(NodeError) as err:
        call(sm.clip_vision_encode, env, clip_vision=style, image=torch.rand(1, 32, 32, 3), crop="center")
    assert err.value.input_name == "clip_vision"


def test_the_shipped_workflow_equals_the_pipelines(registry, env, parts):
    """workflows/flux-redux.json with its named parameters, on the tiny files."""
    from engine.workflow import load

    picture = _picture()
    picture.save(env.paths.input.root / "picture.png")
    repo = Path(__file__).resolve().parent.parent
    wf = load(repo / "workflows" / "flux-redux.json").with_overrides(dict(
        diffusion_model=SPLIT["unet"], clip_l=SPLIT["clip_l"], t5xxl=SPLIT["t5"], vae=SPLIT["vae"],
        clip_vision=VISION, style_model=REDUX, image="picture.png", prompt=PROMPT, width=SIZE, height=SIZE,
        steps=4, seed=3))
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    embeds, pooled = _prior(parts, picture)
    with torch.no_grad():
        theirs = tiny_flux.pipeline("dev")(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE,
                                            num_inference_steps=4, guidance_scale=3.5, output_type="np",
                                            generator=torch.Generator().manual_seed(3)).images
    assert np.abs(outcome.results["13"][0].numpy() - theirs).max() <= 1 / 255 + 1e-6
