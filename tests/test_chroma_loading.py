"""Chroma from the files people have, through the real loader nodes, against diffusers' pipelines.

The tiny Chroma (tests/tiny_chroma.py) is written in ComfyUI's split layout (original keys, with
and without ``model.diffusion_model.``) and as a diffusers folder. The shipped workflows run on
the split files and equal ChromaPipeline / ChromaImg2ImgPipeline from the raw prompts within
1/255 per pixel; ComfyUI's Chroma template graph (API format, T5TokenizerOptions) runs unchanged;
wrong files get errors naming the node input.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_chroma
from engine.context import NodeError
from engine.workflow import load, parse
from flow_family_files import (checkpoint_loader, env, fp8_sampling_gap, models_root,  # noqa: F401 (env and
                               pipeline_images, registry, run, txt2img_graph, unet_weights)  # registry: fixtures)
from node_call import Called, call
from nodes import loaders, split_loaders
from nodes.checkpoint import chroma_keys
from nodes.families import chroma

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse on a cliff"
NEGATIVE = "blurry, dark"
SIZE = 64
SPLIT = dict(diffusion_model="tiny-chroma.safetensors", t5xxl="tiny-t5xxl.safetensors", vae="tiny-flux-ae.safetensors")


root = models_root(tiny_chroma.make_models_folder, "chroma-models")


def _reference(seed: int, steps: int, cfg: float, **img2img) -> np.ndarray:
    from diffusers import ChromaImg2ImgPipeline

    return pipeline_images(tiny_chroma.pipeline, ChromaImg2ImgPipeline if img2img else None, prompt=PROMPT,
                           negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                           guidance_scale=cfg, output_type="np", generator=torch.Generator("cpu").manual_seed(seed),
                           **img2img)


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-chroma.safetensors", "tiny-chroma-prefixed.safetensors",
                                  "tiny-chroma-diffusers-keys.safetensors"])
def test_split_file_and_diffusers_folder_load_the_same_weights_bit_for_bit(env, name):
    rec = Called()
    (model,) = call(split_loaders.unet_loader, env, rec, unet_name=name)
    assert model.family is chroma.FAMILY and any("chroma UNet" in m for m in rec.messages)
    (folder, clip, vae) = call(loaders.checkpoint_loader, env, ckpt_name="tiny-chroma-diffusers")
    (pipeline, _, _) = call(loaders.diffusers_loader, env, model_path="tiny-chroma")
    assert folder.family is pipeline.family is clip.family is chroma.FAMILY
    split, whole, other = unet_weights(model), unet_weights(folder), unet_weights(pipeline)
    want = tiny_chroma.components()["transformer"].state_dict()
    assert set(split) == set(whole) == set(other) == set(want)
    assert all(torch.equal(split[k], want[k]) and torch.equal(whole[k], want[k]) and torch.equal(other[k], want[k])
               for k in want)
    (t5,) = call(split_loaders.clip_loader, env, clip_name=SPLIT["t5xxl"], type="chroma")
    assert t5.family is chroma.FAMILY
    with t5.encoder("text_encoder") as a, clip.encoder("text_encoder") as b:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusers_folder_graph_equals_chroma_pipeline(registry, env):
    """CheckpointLoaderSimple on the folder (its own tokenizer and scheduler config), API format."""
    graph = txt2img_graph(checkpoint_loader("tiny-chroma-diffusers"), prompt=PROMPT, negative=NEGATIVE, size=SIZE,
                          seed=8, steps=4, cfg=5.0, scheduler="normal", prefix="chroma")
    kiln = run(registry, env, parse(graph)).results["6"][0].numpy()
    assert np.abs(kiln - _reference(8, 4, 5.0)).max() <= 1 / 255
    assert np.abs(kiln - _reference(9, 4, 5.0)).max() > 0.02


def test_weight_dtype_fp8_keeps_fp8_linears_and_stays_close(env):
    import test_chroma

    gap = fp8_sampling_gap(env, SPLIT["diffusion_model"], test_chroma._clip(),
                           lambda net: net.transformer_blocks[0].attn.to_q.weight, prompt=PROMPT, negative=NEGATIVE,
                           scheduler="normal")
    assert 0 < gap < 0.1  # 8-bit weights: close, not equal


def test_key_map_matches_diffusers_converter_at_the_released_width():
    """Our map gives the keys and shapes diffusers' Chroma converter gives (built on meta: no memory)."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        big = ChromaTransformer2DModel(num_layers=2, num_single_layers=2)
    original = chroma_keys.diffusers_to_original(big.state_dict())
    assert any(k.startswith("distilled_guidance_layer.layers.0.in_layer") for k in original)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(original))
    ours = chroma_keys.original_to_diffusers(dict(original))
    assert set(theirs) == set(ours) == set(big.state_dict())
    assert all(theirs[k].shape == ours[k].shape for k in ours)
    config = chroma_keys.transformer_config({k: tuple(v.shape) for k, v in original.items()})
    assert config["axes_dims_rope"] == (16, 56, 56) and config["approximator_layers"] == 5


# -- workflows ---------------------------------------------------------------------------------


def test_txt2img_workflow_on_split_files_equals_chroma_pipeline(registry, env):
    wf = load(REPO / "workflows" / "chroma-txt2img.json").with_overrides(
        dict(SPLIT, prompt=PROMPT, negative_prompt=NEGATIVE, cfg=4.0, width=SIZE, height=SIZE, steps=4, seed=3))
    kiln = run(registry, env, wf).results["8"][0].numpy()
    assert np.abs(kiln - _reference(3, 4, 4.0)).max() <= 1 / 255
    assert np.abs(kiln - _reference(3, 4, 1.5)).max() > 0.01  # cfg matters: the comparison is not vacuous


def test_img2img_workflow_on_split_files_equals_chroma_img2img_pipeline(registry, env):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "init.png")
    outcomes = {}
    for strength in (0.6, 0.3):
        wf = load(REPO / "workflows" / "chroma-img2img.json").with_overrides(
            dict(SPLIT, prompt=PROMPT, negative_prompt=NEGATIVE, cfg=3.0, image="init.png", width=SIZE,
                 height=SIZE, strength=strength, steps=6, seed=7))
        outcomes[strength] = run(registry, env, wf)
    kiln = outcomes[0.6].results["11"][0].numpy()
    init = chroma.FAMILY.latent.to_model(outcomes[0.6].results["8"][0]["samples"])
    assert np.abs(kiln - _reference(7, 6, 3.0, image=init, strength=0.6)).max() <= 1 / 255
    assert np.abs(kiln - outcomes[0.3].results["11"][0].numpy()).max() > 0.02  # strength matters


def _comfy_template(seed: int = 3) -> dict:
    """ComfyUI's Chroma template graph, API format, at the tests' size."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["diffusion_model"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": SPLIT["t5xxl"], "type": "chroma",
                                                     "device": "default"}},
        "3": {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["2", 0], "min_padding": 1, "min_length": 0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["3", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 4, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["8", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "chroma"}},
    }


def test_comfyui_chroma_template_runs_unchanged(registry, env):
    """ComfyUI's template (T5TokenizerOptions: one pad token, no mask, as ComfyUI encodes) equals the
    same sampling on the tiny model's own parts with that encoding; the seed matters."""
    import test_chroma

    kiln = run(registry, env, parse(json.loads(json.dumps(_comfy_template())))).results["9"][0].numpy()
    direct = test_chroma.kiln(PROMPT, NEGATIVE, 4.0, seed=3, clip=test_chroma._clip((1, 0)), scheduler="simple")
    assert np.abs(kiln - direct.numpy()).max() <= 1 / 255
    other = run(registry, env, parse(_comfy_template(seed=4))).results["9"][0].numpy()
    assert np.abs(kiln - other).max() > 0.02


# -- bad input ---------------------------------------------------------------------------------


def test_flux_file_in_unet_loader_is_simply_flux(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    assert model.family.name == "flux"


def test_clip_l_as_chromas_text_encoder_names_what_it_needs(env):
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="tiny-clip_l.safetensors", type="chroma")
    assert err.value.input_name == "clip_name"
    assert "'chroma' needs T5-XXL" in str(err.value) and "tiny-clip_l.safetensors (CLIP-L)" in str(err.value)


def test_damaged_chroma_file_names_family_and_keys(env, root):
    from safetensors.torch import save_file

    state = tiny_chroma.original_transformer()
    state.pop("double_blocks.0.img_attn.qkv.weight")
    state["double_blocks.0.img_mod.lin.weight"] = torch.zeros(2)  # a FLUX key Chroma has not
    save_file({k: v.contiguous() for k, v in state.items()},
              str(root / "diffusion_models" / "broken-chroma.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken-chroma.safetensors")
    text = str(err.value)
    assert err.value.input_name == "unet_name"
    assert "Chroma" in text and "img_mod.lin" in text


def test_radiance_and_all_in_one_files_say_what_they_are(env, root):
    from safetensors.torch import save_file

    state = tiny_chroma.original_transformer()
    state["nerf_blocks.0.norm.scale"] = torch.ones(4)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(root / "diffusion_models" / "tiny-chroma-radiance.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="tiny-chroma-radiance.safetensors")
    assert err.value.input_name == "unet_name" and "Chroma1-Radiance" in str(err.value)
    (root / "checkpoints" / "tiny-chroma-aio.safetensors").write_bytes(
        (root / "diffusion_models" / "tiny-chroma-prefixed.safetensors").read_bytes())
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-chroma-aio.safetensors")
    assert err.value.input_name == "ckpt_name"
    assert "Chroma transformer" in str(err.value) and "CLIPLoader (type chroma)" in str(err.value)


def test_flux_guidance_on_chroma_is_reported_as_ignored(env):
    from nodes.flux_nodes import flux_guidance
    from nodes.sampling import ksampler

    (model,) = call(split_loaders.unet_loader, env, unet_name=SPLIT["diffusion_model"])
    (clip,) = call(split_loaders.clip_loader, env, clip_name=SPLIT["t5xxl"], type="chroma")
    (cond,) = call(flux_guidance, env, conditioning=clip.encode(PROMPT), guidance=3.5)
    rec = Called()
    call(ksampler, env, rec, model=model, seed=1, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple",
         positive=cond, negative=clip.encode(NEGATIVE), latent_image={"samples": torch.zeros(1, 16, 8, 8)},
         denoise=1.0)
    assert any("guidance 3.5 is ignored" in m and "Chroma has no distilled guidance" in m for m in rec.messages)


# -- ComfyUI's own Chroma templates, as its editor saved them ----------------------------------


def _editor_template(module: str) -> dict:
    import importlib

    folder = Path(importlib.import_module(module).__file__).parent / "templates"
    return json.loads((folder / "image_chroma_text_to_image.json").read_text(encoding="utf-8"))


def _run_template(registry, env, module: str, overrides: dict):
    from engine.formats import parse_document

    wf = parse_document(_editor_template(module), registry).with_overrides(overrides)
    return wf, run(registry, env, wf)


def test_chroma1_hd_template_equals_chroma_pipeline_on_its_sigmas(registry, env):
    """The Chroma1-HD template (comfyui-workflow-templates-json): SamplerCustomAdvanced with CFGGuider,
    BasicScheduler beta, ModelSamplingAuraFlow shift 1 and T5TokenizerOptions (0, 0), i.e. ComfyUI's
    unpadded, unmasked T5. diffusers' ChromaPipeline gets the same prompt states (an all-ones mask, which
    adds the same bias to every attention logit: no mask) and the template's own sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    wf, outcome = _run_template(registry, env, "comfyui_workflow_templates_json", {
        "731.unet_name": SPLIT["diffusion_model"], "733.clip_name": SPLIT["t5xxl"], "710.vae_name": SPLIT["vae"],
        "737.width": SIZE, "737.height": SIZE, "734.steps": 5, "718.noise_seed": 11})
    ours = outcome.results["298"][0].numpy()
    sigmas = outcome.results["734"][0]
    assert sigmas.shape == (6,) and float(sigmas[-1]) == 0.0
    (clip,) = call(split_loaders.clip_loader, env, clip_name=SPLIT["t5xxl"], type="chroma")
    from dataclasses import replace

    clip = replace(clip, t5_padding=(0, 0))
    pos, neg = (clip.encode(wf.nodes[n].inputs["text"])[0][0] for n in ("748", "749"))
    assert pos.shape[1] == len(tiny_chroma.components()["tokenizer"](wf.nodes["748"].inputs["text"]).input_ids)
    pipe = tiny_chroma.pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                 use_dynamic_shifting=False)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=pos, prompt_attention_mask=torch.ones(pos.shape[:2]),
                      negative_prompt_embeds=neg, negative_prompt_attention_mask=torch.ones(neg.shape[:2]),
                      sigmas=sigmas[:-1].tolist(), height=SIZE, width=SIZE, guidance_scale=3.5,
                      num_inference_steps=5, output_type="np", generator=torch.Generator("cpu").manual_seed(11)).images
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.abs(ours - _reference(11, 5, 3.5)).max() > 0.01  # diffusers' own encoding differs: not vacuous


def test_chroma_v33_template_runs_unchanged(registry, env):
    """The older template (comfyui-workflow-templates 0.1.48): KSampler cfg 4 with its T5TokenizerOptions
    and FreSca bypassed, so the CLIP is the loader's own (Kiln's default, diffusers' encoding). It equals
    the same sampling through the family directly (tests/test_chroma.py's, which equals ChromaPipeline)."""
    import test_chroma

    wf, outcome = _run_template(registry, env, "comfyui_workflow_templates", {
        "13.unet_name": SPLIT["diffusion_model"], "10.clip_name": SPLIT["t5xxl"], "15.vae_name": SPLIT["vae"],
        "12.width": SIZE, "12.height": SIZE, "3.steps": 4, "3.seed": 5})
    ours = outcome.results["8"][0].numpy()
    direct = test_chroma.kiln(wf.nodes["6"].inputs["text"], wf.nodes["7"].inputs["text"], 4.0, seed=5,
                              scheduler="simple")
    assert np.abs(ours - direct.numpy()).max() <= 1 / 255
