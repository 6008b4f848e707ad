"""Cosmos Predict2 text to image on a tiny random model: Kiln against diffusers' Cosmos2TextToImagePipeline.

The tiny model (tests/tiny_cosmos.py) is written as ComfyUI users keep it: the transformer in the original
layout (bare, under ``model.diffusion_model.``, under NVIDIA's ``net.``) and with diffusers' names, a T5 v1.0
("oldt5") file, the Wan 2.1 VAE. ComfyUI's API graph (UNETLoader, CLIPLoader type cosmos, VAELoader,
EmptySD3LatentImage, CLIPTextEncode, KSampler, VAEDecode, SaveImage) runs unchanged. KSampler's ``euler`` with
the ``karras`` schedule is the pipeline's scheduler (FlowMatchEulerDiscreteScheduler with Karras sigmas from
80 to 0.002); diffusers' guidance_scale g is cfg g + 1. Images must agree within 1/255 per pixel, and the
prompt and the seed must each move the image clearly more than that.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_cosmos
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run, unet_weights  # noqa: F401 (env, registry: fixtures)
from node_call import call
from nodes import split_loaders
from nodes.families import cosmos

PROMPT = "a robot arm stacking red cubes"
NEGATIVE = "blurry, low quality"
SIZE = 64
PIXEL_TOL = 1 / 255

root = models_root(tiny_cosmos.make_models_folder, "cosmos-models")


def reference(seed: int, steps: int, cfg: float, prompt: str = PROMPT) -> np.ndarray:
    """The pipeline's image [1, H, W, 3] in 0..1 (guidance_scale = cfg - 1), before its safety path rounds it down
    to 8 bits: its latent (``output_type="latent"``) decoded as its ``__call__`` decodes (the VAE's
    ``latents_std`` and ``latents_mean``, its video processor)."""
    pipe = tiny_cosmos.pipeline()
    with torch.no_grad():
        latents = pipe(prompt=prompt, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                       guidance_scale=cfg - 1.0, generator=torch.Generator("cpu").manual_seed(seed),
                       output_type="latent").images.unsqueeze(2)
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        video = pipe.vae.decode(latents * std / pipe.scheduler.config.sigma_data + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")[:, 0]


def comfy_graph(seed: int = 3, steps: int = 6, cfg: float = 4.0, unet: str = "tiny-cosmos.safetensors",
                prompt: str = PROMPT, scheduler: str = "karras") -> dict:
    """ComfyUI's Cosmos Predict2 text-to-image graph in API format, at the tests' size."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny-oldt5_xxl.safetensors", "type": "cosmos",
                                                     "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-wan_2.1_vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": scheduler,
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "cosmos"}},
    }


def _image(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(json.loads(json.dumps(graph)))).results["8"][0].numpy()


# -- text ------------------------------------------------------------------------------------------


def test_prompt_encoding_is_the_pipelines(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name="tiny-oldt5_xxl.safetensors", type="cosmos")
    assert clip.family is cosmos.FAMILY
    states, extra = clip.encode(PROMPT)[0]
    with torch.no_grad():
        theirs = tiny_cosmos.pipeline()._get_t5_prompt_embeds(PROMPT, device=torch.device("cpu"))
    assert states.shape == theirs.shape == (1, 512, tiny_cosmos.TEXT) and cosmos.MASK not in extra
    assert torch.allclose(states, theirs, atol=1e-5)
    assert states[0, 20:].abs().max() == 0 and states[0, :5].abs().min() > 0  # the padding is zero, the prompt not


# -- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-cosmos.safetensors", "tiny-cosmos-prefixed.safetensors",
                                  "tiny-cosmos-net.safetensors", "tiny-cosmos-diffusers-keys.safetensors"])
def test_every_layout_loads_the_same_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is cosmos.FAMILY
    got = unet_weights(model)
    want = tiny_cosmos.components()["transformer"].state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_key_map_agrees_with_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    from nodes.checkpoint.cosmos_keys import original_to_diffusers

    original = {"net." + k: v for k, v in tiny_cosmos.original_state().items()}
    theirs = convert_cosmos_transformer_checkpoint_to_diffusers(dict(original))
    ours = original_to_diffusers({k[4:]: v for k, v in original.items()})
    assert set(ours) == set(theirs) and all(ours[k] is theirs[k] for k in ours)


@pytest.mark.parametrize("change,named", [
    (lambda state: state.pop("blocks.1.cross_attn.k_proj.weight"), "blocks.1.cross_attn.k_proj.weight"),
    (lambda state: state.update({"blocks.0.cross_attn.extra_proj.weight": torch.ones(4, 4)}),
     "blocks.0.cross_attn.extra_proj.weight")])
def test_damaged_file_names_the_file_and_the_keys(env, root, change, named):
    from safetensors.torch import save_file

    state = tiny_cosmos.original_state()
    change(state)
    path = root / "diffusion_models" / "broken-cosmos.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken-cosmos.safetensors")
    text = str(err.value)
    assert err.value.input_name == "unet_name" and "broken-cosmos.safetensors" in text and "Cosmos" in text
    assert named in text or named.replace("blocks.1.cross_attn.k_proj", "transformer_blocks.1.attn2.to_k") in text, text


def test_checkpoint_loader_on_the_transformer_says_which_loaders(env, root):
    from nodes import loaders

    (root / "checkpoints").mkdir(exist_ok=True)
    (root / "checkpoints" / "tiny-cosmos-aio.safetensors").write_bytes(
        (root / "diffusion_models" / "tiny-cosmos.safetensors").read_bytes())
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-cosmos-aio.safetensors")
    assert err.value.input_name == "ckpt_name"
    assert "Cosmos Predict2 transformer" in str(err.value) and "CLIPLoader (type cosmos)" in str(err.value)


def test_a_flux_t5_under_type_cosmos_is_a_t5_too():
    """T5 v1.1 (gated GELU) and v1.0 (ReLU) build from their own keys: the feed-forward decides."""
    from nodes.checkpoint.flux_load import build_t5

    t5 = build_t5(tiny_cosmos.components()["text_encoder"].state_dict(), "", "oldt5", torch.float32)
    assert t5.config.feed_forward_proj == "relu" and not t5.config.is_gated_act


# -- sampling -------------------------------------------------------------------------------------


def test_comfyui_graph_equals_the_pipeline(registry, env):
    ours = _image(registry, env, comfy_graph())
    theirs = reference(3, 6, 4.0)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    gap = np.abs(ours - theirs).max()
    print(f"KSampler euler/karras against the pipeline: {gap * 255:.4f}/255")
    assert gap <= PIXEL_TOL
    assert np.abs(ours - _image(registry, env, comfy_graph(seed=4))).max() > 0.02  # the seed matters
    assert np.abs(ours - _image(registry, env, comfy_graph(prompt="a green field at dawn"))).max() > 0.02  # the prompt


def test_custom_sampling_stopping_at_sigma_min_is_the_pipeline_exactly(registry, env):
    """The pipeline's last step goes from 0.002 to 0.002 (final_sigmas_type "sigma_min"): its image is the state
    at level 0.002, not the prediction at 0. KarrasScheduler's list split before its last step, sampled with
    SamplerCustom, stops there too, and then agrees to float rounding."""
    graph = comfy_graph()
    del graph["7"]
    graph |= {
        "10": {"class_type": "KarrasScheduler", "inputs": {"steps": 6, "sigma_max": 80.0, "sigma_min": 0.002,
                                                           "rho": 7.0}},
        "11": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["10", 0], "step": 5}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 3,
                                                         "cfg": 4.0, "positive": ["4", 0], "negative": ["5", 0],
                                                         "sampler": ["12", 0], "sigmas": ["11", 0],
                                                         "latent_image": ["6", 0]}},
    }
    ours = _image(registry, env, graph)
    gap = np.abs(ours - reference(3, 6, 4.0)).max()
    print(f"SamplerCustom stopping at 0.002 against the pipeline: {gap * 255:.5f}/255")
    assert gap <= 0.01 / 255


def test_model_sampling_continuous_edm_cosmos_rflow_is_the_familys(env):
    from nodes.custom_sampling import model_sampling_continuous_edm
    from node_call import Recorder

    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-cosmos.safetensors")
    (patched,) = model_sampling_continuous_edm(Recorder().ctx, model, "cosmos_rflow", 80.0, 0.002)
    assert patched.scheduler_config == cosmos.FAMILY.scheduler_config()


def test_skip_layer_guidance_names_why_it_skips_nothing():
    """ComfyUI's MiniTrainDIT never applies the block replacements SkipLayerGuidanceDiT sets."""
    from nodes.families.base import ConditioningError

    with pytest.raises(ConditioningError) as err:
        cosmos.FAMILY.dit_blocks(tiny_cosmos.components()["transformer"])
    assert "Cosmos Predict2" in str(err.value) and "skip nothing" in str(err.value)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "uni_pc", "res_multistep", "er_sde", "heun"])
def test_other_samplers_run_and_land_near_euler(sampler):
    """The continuous-time samplers on the rflow rule: each gives a finite latent, the deterministic ones near
    euler's at 12 steps (er_sde draws fresh noise: it lands elsewhere, as in ComfyUI)."""
    from flow_family_files import clip_over, model_over
    from node_call import Recorder
    from nodes.sampling import ksampler

    parts = tiny_cosmos.components()
    model = model_over(cosmos.FAMILY, parts["transformer"])
    clip = clip_over(cosmos.FAMILY, parts["tokenizer"], parts["text_encoder"])
    pos, neg = clip.encode(PROMPT), clip.encode(NEGATIVE)

    def latent(name: str) -> torch.Tensor:
        (out,) = ksampler(Recorder().ctx, model, 3, 12, 4.0, name, "karras", pos, neg,
                          {"samples": torch.zeros(1, 16, 8, 8)})
        return out["samples"]

    ours, euler = latent(sampler), latent("euler")
    assert torch.isfinite(ours).all() and (ours - euler).abs().max() > 1e-3
    if sampler != "er_sde":
        assert (ours - euler).abs().max() < 0.5 * euler.abs().max()


def test_model_merge_cosmos_predict2_2b_takes_each_original_block_s_ratio():
    from node_call import model_in_memory
    from nodes import model_merging as mm

    a, b = tiny_cosmos.build(seed=1)["transformer"], tiny_cosmos.build(seed=2)["transformer"]
    w1 = {k: v.detach().clone() for k, v in a.named_parameters()}
    w2 = {k: v.detach().clone() for k, v in b.named_parameters()}
    ratios = {**{block: 1.0 for block in mm.COSMOS_2B_BLOCKS}, "x_embedder.": 0.1, "t_embedder.": 0.2,
              "t_embedding_norm.": 0.3, "blocks.1.": 0.4, "final_layer.": 0.5}
    (merged,) = call(mm.model_merge_cosmos_predict2_2b, None, model1=model_in_memory(cosmos.FAMILY, a),
                     model2=model_in_memory(cosmos.FAMILY, b), **ratios)
    with merged.unet() as net:
        got = {k: v.detach().clone() for k, v in net.named_parameters()}
    for name, r in {"patch_embed.proj.weight": 0.1, "time_embed.t_embedder.linear_1.weight": 0.2,
                    "time_embed.norm.weight": 0.3, "transformer_blocks.1.attn2.to_k.weight": 0.4,
                    "transformer_blocks.0.attn2.to_k.weight": 1.0, "norm_out.linear_1.weight": 0.5,
                    "proj_out.weight": 0.5}.items():
        assert not torch.allclose(w1[name], w2[name]), name
        assert torch.allclose(got[name], r * w1[name] + (1 - r) * w2[name], atol=1e-6), name
