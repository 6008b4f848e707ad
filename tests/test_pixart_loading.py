"""PixArt-Σ and PixArt-α from the files people have, through the real loader nodes, against diffusers.

The tiny PixArts (tests/tiny_pixart.py) are written as ComfyUI users keep them: the transformer in
PixArt's original key layout (bare, under ``model.diffusion_model.``, in diffusers' names, and as a
.pth nesting its tensors under ``state_dict``), the tiny FLUX's T5 as ``t5xxl``, a 4-channel VAE file;
and as diffusers folders. ComfyUI's API-format PixArt-Σ graph (UNETLoader, CLIPLoader type pixart,
VAELoader, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage) runs unchanged and equals
PixArtSigmaPipeline within 1/255 per pixel; wrong files and wrong encoders are errors naming the node
input.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_pixart
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import (checkpoint_loader, env, models_root, registry, run,  # noqa: F401 (env and
                               txt2img_graph, unet_weights)  # registry: fixtures)
from node_call import Called, call
from nodes import loaders, split_loaders
from nodes.families import pixart

PROMPT = "a lighthouse on a cliff"
NEGATIVE = "blurry, dark"
SIZE = 64
T5 = "tiny-t5xxl.safetensors"

root = models_root(tiny_pixart.make_models_folder, "pixart-models")


def _family(variant: str):
    return pixart.SIGMA if variant == "sigma" else pixart.ALPHA


def _reference(variant: str, seed: int, steps: int, cfg: float, prompt: str = PROMPT) -> np.ndarray:
    pipe = tiny_pixart.pipeline(variant)
    with torch.no_grad():
        return pipe(prompt=prompt, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                    guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                    use_resolution_binning=False, clean_caption=False).images


def comfy_graph(variant: str = "sigma", seed: int = 3, unet: str | None = None, clip: str = T5,
                prompt: str = PROMPT) -> dict:
    """ComfyUI's PixArt graph in API format, as its frontend queues it, at the tests' size."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet or f"tiny-pixart-{variant}.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "pixart", "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": f"tiny-pixart-{variant}-vae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 4, "cfg": 4.5,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "pixart"}},
    }


# -- loading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-pixart-sigma.safetensors", "tiny-pixart-sigma-prefixed.safetensors",
                                  "tiny-pixart-sigma-diffusers-keys.safetensors", "tiny-pixart-sigma.pth"])
def test_sigma_files_and_folders_load_the_same_weights_bit_for_bit(env, name):
    rec = Called()
    (model,) = call(split_loaders.unet_loader, env, rec, unet_name=name)
    assert model.family is pixart.SIGMA
    (folder, clip, vae) = call(loaders.checkpoint_loader, env, ckpt_name="tiny-pixart-sigma-diffusers")
    (pipeline, _, _) = call(loaders.diffusers_loader, env, model_path="tiny-pixart-sigma")
    assert folder.family is pipeline.family is clip.family is pixart.SIGMA
    want = tiny_pixart.components("sigma")["transformer"].state_dict()
    for got in (unet_weights(model), unet_weights(folder), unet_weights(pipeline)):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    (t5,) = call(split_loaders.clip_loader, env, clip_name=T5, type="pixart")
    assert t5.family is pixart.SIGMA
    with t5.encoder("text_encoder") as a, clip.encoder("text_encoder") as b:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("variant", ["alpha", "alpha512"])
def test_alpha_files_load_as_alpha_with_their_sample_size(env, variant):
    (model,) = call(split_loaders.unet_loader, env, unet_name=f"tiny-pixart-{variant}.safetensors")
    assert model.family is pixart.ALPHA and model.latent.scale == 0.18215
    want = tiny_pixart.components(variant)["transformer"]
    with model._use_unet() as net:
        assert net.config.sample_size == want.config.sample_size
        assert net.use_additional_conditions == (variant == "alpha")
    got = unet_weights(model)
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    (folder, clip, _) = call(loaders.checkpoint_loader, env, ckpt_name="tiny-pixart-alpha-diffusers")
    assert folder.family is clip.family is pixart.ALPHA


def test_sample_size_of_a_file_without_pos_embed_comes_from_its_name():
    from nodes.checkpoint import pixart_keys

    assert pixart_keys.sample_size({}, "PixArt-Sigma-XL-2-1024-MS.pth") == 128
    assert pixart_keys.sample_size({}, "PixArt-Sigma-XL-2-512-MS.safetensors") == 64
    assert pixart_keys.sample_size({}, "PixArt-Sigma-XL-2-2K-MS.pth") == 256
    assert pixart_keys.sample_size({"pos_embed": (1, 1024, 1152)}, "PixArt-Sigma-XL-2-1024-MS.pth") == 64


# -- workflows ----------------------------------------------------------------------------------------


def test_comfyui_pixart_sigma_graph_runs_unchanged_and_equals_the_pipeline(registry, env):
    kiln = run(registry, env, parse(json.loads(json.dumps(comfy_graph())))).results["8"][0].numpy()
    assert np.abs(kiln - _reference("sigma", 3, 4, 4.5)).max() <= 1 / 255
    other = run(registry, env, parse(comfy_graph(seed=4))).results["8"][0].numpy()
    assert np.abs(kiln - other).max() > 0.02  # the seed matters: the comparison is not vacuous


def test_comfyui_pixart_alpha_graph_equals_the_pipeline(registry, env):
    kiln = run(registry, env, parse(comfy_graph("alpha", seed=5))).results["8"][0].numpy()
    assert np.abs(kiln - _reference("alpha", 5, 4, 4.5)).max() <= 1 / 255
    assert np.abs(kiln - _reference("alpha", 5, 4, 4.5, prompt="a red car")).max() > 0.02


def test_the_shipped_workflow_on_split_files_equals_the_pipeline(registry, env):
    from pathlib import Path

    from engine.workflow import load

    wf = load(Path(__file__).parent.parent / "workflows" / "pixart-sigma-txt2img.json").with_overrides(
        dict(diffusion_model="tiny-pixart-sigma.safetensors", t5xxl=T5, vae="tiny-pixart-sigma-vae.safetensors",
             prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=4, seed=3))
    kiln = run(registry, env, wf).results["8"][0].numpy()
    assert np.abs(kiln - _reference("sigma", 3, 4, 4.5)).max() <= 1 / 255
    assert np.abs(kiln - _reference("sigma", 3, 4, 1.5)).max() > 0.02  # cfg matters: not vacuous


def test_diffusers_folder_graph_equals_the_pipeline(registry, env):
    """CheckpointLoaderSimple on the Σ folder (its own tokenizer, scheduler config and VAE scale)."""
    graph = txt2img_graph(checkpoint_loader("tiny-pixart-sigma-diffusers"), prompt=PROMPT, negative=NEGATIVE,
                          size=SIZE, seed=8, steps=4, cfg=4.5, scheduler="normal", latent="EmptyLatentImage",
                          prefix="pixart")
    kiln = run(registry, env, parse(graph)).results["6"][0].numpy()
    assert np.abs(kiln - _reference("sigma", 8, 4, 4.5)).max() <= 1 / 255
    assert np.abs(kiln - _reference("sigma", 9, 4, 4.5)).max() > 0.02


# -- bad input ----------------------------------------------------------------------------------------


def test_clip_l_as_pixarts_text_encoder_names_node_and_input(env):
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="tiny-clip_l.safetensors", type="pixart")
    assert err.value.input_name == "clip_name"
    assert "'pixart' needs T5-XXL" in str(err.value) and "tiny-clip_l.safetensors (CLIP-L)" in str(err.value)


def test_a_clip_l_prompt_on_a_pixart_model_names_ksampler_and_positive(registry, env):
    """A PixArt transformer with a CLIP-L (CLIPLoader type stable_diffusion) instead of T5: the graph
    fails at KSampler's ``positive``, saying the widths (a real CLIP-L is 768 wide, T5-XXL 4096)."""
    from engine.executor import Executor

    graph = comfy_graph(clip="tiny-sd1-clip_l.safetensors")
    graph["2"]["inputs"]["type"] = "stable_diffusion"
    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status != "succeeded"
    error = outcome.error
    assert error.node_id == "7" and error.input_name == "positive", error
    assert "64 wide" in error.message and "pixart_sigma model takes 32" in error.message


def test_damaged_pixart_file_names_family_and_keys(env, root):
    from safetensors.torch import save_file

    state = tiny_pixart.original_transformer("sigma")
    state.pop("blocks.1.cross_attn.kv_linear.weight")
    state["blocks.0.attn.q_norm.weight"] = torch.ones(72)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(root / "diffusion_models" / "broken-pixart.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken-pixart.safetensors")
    text = str(err.value)
    assert err.value.input_name == "unet_name"
    assert "PixArt" in text and "blocks.1.cross_attn.kv_linear.weight" in text and "q_norm" in text


def test_checkpoint_loader_on_the_transformer_says_which_loaders(env, root):
    (root / "checkpoints" / "tiny-pixart-aio.safetensors").write_bytes(
        (root / "diffusion_models" / "tiny-pixart-sigma.safetensors").read_bytes())
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-pixart-aio.safetensors")
    assert err.value.input_name == "ckpt_name"
    assert "PixArt transformer" in str(err.value) and "CLIPLoader (type pixart)" in str(err.value)


def test_weight_dtype_fp8_keeps_fp8_linears_and_stays_close(env):
    """UNETLoader weight_dtype fp8_e4m3fn: the linear weights are stored in fp8 and the sampled latent
    stays close to the default one's (8-bit weights: close, not equal)."""
    from flow_family_files import clip_over
    from nodes.sampling import ksampler

    parts = tiny_pixart.components("sigma")
    clip = clip_over(pixart.SIGMA, parts["tokenizer"], parts["text_encoder"])
    latents = {}
    for weight_dtype in ("default", "fp8_e4m3fn"):
        (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-pixart-sigma.safetensors",
                        weight_dtype=weight_dtype)
        with model._use_unet() as net:
            stored = net.transformer_blocks[0].attn1.to_q.weight.dtype
        assert (stored == torch.float8_e4m3fn) == (weight_dtype != "default")
        (out,) = call(ksampler, env, model=model, seed=3, steps=3, cfg=4.5, sampler_name="euler", scheduler="normal",
                      positive=clip.encode(PROMPT), negative=clip.encode(NEGATIVE),
                      latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
        latents[weight_dtype] = out["samples"]
    gap = float((latents["default"] - latents["fp8_e4m3fn"]).abs().max() / latents["default"].abs().max())
    assert 0 < gap < 0.1


@pytest.mark.parametrize("variant", ["alpha", "sigma"])
def test_key_map_and_config_at_the_released_size(variant):
    """The released XL-2 layout (built on meta: no memory): the original names and shapes PixArt's own
    checkpoints have (diffusers' conversion scripts read these), and the config read back from them is
    the one diffusers' converters write (alpha-1024: micro-conditioning; sigma-1024: none)."""
    from diffusers import PixArtTransformer2DModel

    from nodes.checkpoint import pixart_keys

    micro = variant == "alpha"
    with torch.device("meta"):
        big = PixArtTransformer2DModel(num_layers=28, caption_channels=4096, sample_size=128,
                                       interpolation_scale=2, use_additional_conditions=micro)
    original = pixart_keys.diffusers_to_original(big.state_dict())
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert shapes["t_block.1.weight"] == (6 * 1152, 1152) and shapes["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert shapes["blocks.27.attn.qkv.weight"] == (3 * 1152, 1152)
    assert shapes["blocks.0.cross_attn.kv_linear.weight"] == (2 * 1152, 1152)
    assert shapes["y_embedder.y_proj.fc1.weight"] == (1152, 4096) and shapes["final_layer.linear.weight"] == (32, 1152)
    assert ("csize_embedder.mlp.0.weight" in shapes) == ("ar_embedder.mlp.2.bias" in shapes) == micro
    assert set(pixart_keys.original_to_diffusers(dict(original))) == set(big.state_dict())
    tokens = pixart_keys.ALPHA_TOKENS if micro else pixart_keys.SIGMA_TOKENS
    shapes["y_embedder.y_embedding"] = (tokens, 4096)
    config = pixart_keys.transformer_config(shapes, "PixArt-XL-2-1024-MS.pth")
    assert pixart_keys.variant(shapes) == variant
    assert {k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "out_channels",
                                   "sample_size", "interpolation_scale", "use_additional_conditions")} == \
        dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, out_channels=8, sample_size=128,
             interpolation_scale=2, use_additional_conditions=micro)
