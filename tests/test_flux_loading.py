"""FLUX from the files people have, through the real loader nodes, against diffusers' pipelines.

The tiny FLUX (tests/tiny_flux.py) is written in ComfyUI's split layout (BFL keys,
also with fp8 weights), as an all-in-one checkpoint and as a diffusers folder.
The shipped workflows run on it unchanged and equal FluxImg2ImgPipeline /
FluxPipeline (prompt encoding included) within 1/255 per pixel; a ComfyUI
API-format graph runs as is; wrong files get errors naming the node input.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux
from engine.context import NodeError
from engine.workflow import load, parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (env and registry are fixtures)
from node_call import Called, call
from nodes import loaders, split_loaders
from nodes.checkpoint import flux_keys

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse on a cliff"
SIZE = 64
SPLIT = dict(diffusion_model="tiny-flux-dev.safetensors", clip_l="tiny-clip_l.safetensors",
             t5xxl="tiny-t5xxl.safetensors", vae="tiny-flux-ae.safetensors")


root = models_root(tiny_flux.make_models_folder, "flux-models")


def _reference_img2img(init_model_latent, strength, guidance, steps, seed, variant="dev"):
    from diffusers import FluxImg2ImgPipeline

    pipe = tiny_flux.pipeline(variant, cls=FluxImg2ImgPipeline)
    return pipe(prompt=PROMPT, image=init_model_latent, strength=strength, height=SIZE, width=SIZE,
                num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed)).images


def _img2img(registry, env, strength=0.6, guidance=3.5, **files):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "init.png")
    wf = load(REPO / "workflows" / "flux-img2img.json").with_overrides(
        dict(SPLIT, **files, prompt=PROMPT, image="init.png", width=SIZE, height=SIZE, strength=strength,
             guidance=guidance, steps=6, seed=7))
    return run(registry, env, wf)


def test_flux_img2img_workflow_on_split_files_equals_flux_img2img_pipeline(registry, env):
    from nodes.families.flux import FLUX_LATENT

    outcome = _img2img(registry, env)
    kiln = outcome.results["10"][0].numpy()
    init = FLUX_LATENT.to_model(outcome.results["7"][0]["samples"])
    reference = _reference_img2img(init, 0.6, 3.5, 6, 7)
    assert kiln.shape == reference.shape == (1, SIZE, SIZE, 3)
    assert np.abs(kiln - reference).max() <= 1 / 255
    other = _img2img(registry, env, guidance=8.0).results["10"][0].numpy()
    assert np.abs(kiln - other).max() > 0.003  # guidance reaches the network: not vacuous


def test_fp8_transformer_keeps_fp8_weights_and_stays_close(registry, env):
    full = _img2img(registry, env).results["10"][0].numpy()
    fp8 = _img2img(registry, env, diffusion_model="tiny-flux-dev-fp8.safetensors").results["10"][0].numpy()
    assert 0 < np.abs(full - fp8).max() < 0.1  # fp8 rounding, nothing else
    rec = Called()
    (model,) = call(split_loaders.unet_loader, env, rec, unet_name="tiny-flux-dev-fp8.safetensors")
    with model.unet() as net:
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert "fp8 weights kept fp8" in rec.messages[0]


def test_flux_txt2img_workflow_equals_flux_pipeline(registry, env):
    wf = load(REPO / "workflows" / "flux-txt2img.json").with_overrides(
        dict(SPLIT, prompt=PROMPT, width=SIZE, height=SIZE, steps=4, seed=3, guidance=3.5))
    kiln = run(registry, env, wf).results["7"][0].numpy()
    reference = tiny_flux.pipeline("dev")(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4,
                                          guidance_scale=3.5, output_type="np",
                                          generator=torch.Generator("cpu").manual_seed(3)).images
    assert np.abs(kiln - reference).max() <= 1 / 255
    assert kiln.std() > 0.01


def _checkpoint_img2img(name):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "init.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "AddNoise", "inputs": {"model": ["1", 0], "latent": ["5", 0], "strength": 0.6,
                                                   "seed": 7}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 6, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}},
    }


@pytest.mark.parametrize("name", ["tiny-flux-dev-aio.safetensors", "tiny-flux-dev-diffusers"])
def test_checkpoint_loader_reads_all_in_one_files_and_diffusers_folders(registry, env, name):
    """A ComfyUI API-format graph (CheckpointLoaderSimple, CLIPTextEncode, FluxGuidance) runs unchanged."""
    from nodes.families.flux import FLUX_LATENT
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "init.png")
    outcome = run(registry, env, parse(json.loads(json.dumps(_checkpoint_img2img(name)))))
    kiln = outcome.results["8"][0].numpy()
    reference = _reference_img2img(FLUX_LATENT.to_model(outcome.results["5"][0]["samples"]), 0.6, 3.5, 6, 7)
    assert np.abs(kiln - reference).max() <= 1 / 255


def test_comfyui_api_workflow_with_split_loaders_runs_unchanged(registry, env):
    graph = {
        "10": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["diffusion_model"],
                                                      "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": SPLIT["t5xxl"], "clip_name2": SPLIT["clip_l"],
                                                          "type": "flux"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["11", 0]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "30": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["10", 0], "max_shift": 1.15,
                                                             "base_shift": 0.5, "width": SIZE, "height": SIZE}},
        "31": {"class_type": "KSampler", "inputs": {"model": ["30", 0], "seed": 3, "steps": 4, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["26", 0], "negative": ["26", 0],
                                                    "latent_image": ["27", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["31", 0], "vae": ["12", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}},
    }
    kiln = run(registry, env, parse(graph)).results["8"][0].numpy()
    # ModelSamplingFlux at the sampled size gives diffusers' dynamic shift for that size
    reference = tiny_flux.pipeline("dev")(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4,
                                          guidance_scale=3.5, output_type="np",
                                          generator=torch.Generator("cpu").manual_seed(3)).images
    assert np.abs(kiln - reference).max() <= 1 / 255
    graph["30"]["inputs"].update(width=1024, height=1024)  # the shift for 1024 px: a different schedule
    shifted = run(registry, env, parse(graph)).results["8"][0].numpy()
    assert np.abs(kiln - shifted).max() > 0.003


def _comfy_flux_dev_template(seed: int = 3) -> dict:
    """ComfyUI's FLUX [dev] template graph (custom-sampling nodes), API format, at the tests' size."""
    return {
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["diffusion_model"],
                                                      "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": SPLIT["t5xxl"], "clip_name2": SPLIT["clip_l"],
                                                          "type": "flux"}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["11", 0]}},
        "60": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
        "22": {"class_type": "BasicGuider", "inputs": {"model": ["12", 0], "conditioning": ["60", 0]}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "BasicScheduler", "inputs": {"model": ["12", 0], "scheduler": "simple", "steps": 4,
                                                          "denoise": 1.0}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["27", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}},
    }


def test_comfyui_flux_dev_template_with_custom_sampling_runs_unchanged(registry, env):
    """The template runs as ComfyUI builds it (its scheduler shifts for 1024 px, as ComfyUI's does);
    with ModelSamplingFlux at the sampled size it equals FluxPipeline, and the seed matters."""
    template = run(registry, env, parse(_comfy_flux_dev_template())).results["8"][0].numpy()
    graph = _comfy_flux_dev_template()
    graph["30"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["12", 0], "max_shift": 1.15,
                                                                 "base_shift": 0.5, "width": SIZE, "height": SIZE}}
    graph["22"]["inputs"]["model"] = graph["17"]["inputs"]["model"] = ["30", 0]
    kiln = run(registry, env, parse(graph)).results["8"][0].numpy()
    reference = tiny_flux.pipeline("dev")(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4,
                                          guidance_scale=3.5, output_type="np",
                                          generator=torch.Generator("cpu").manual_seed(3)).images
    assert np.abs(kiln - reference).max() <= 1 / 255
    assert np.abs(template - kiln).max() > 0.003  # the 1024 px shift is another schedule
    graph["25"]["inputs"]["noise_seed"] = 4
    other = run(registry, env, parse(graph)).results["8"][0].numpy()
    assert np.abs(kiln - other).max() > 0.02


def test_key_map_matches_diffusers_converter_at_the_released_width():
    """Our BFL table gives the keys and shapes diffusers' own converter gives (built on meta: no memory)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        big = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    bfl = flux_keys.diffusers_to_bfl(big.state_dict())
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = flux_keys.bfl_to_diffusers(dict(bfl))
    assert set(theirs) == set(ours) == set(big.state_dict())
    assert all(theirs[k].shape == ours[k].shape for k in ours)
    assert flux_keys.transformer_config({k: tuple(v.shape) for k, v in bfl.items()})["axes_dims_rope"] == (16, 56, 56)


# -- bad input --------------------------------------------------------------------------------


def test_transformer_alone_in_checkpoint_loader_says_which_loaders(env):
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-flux-dev-transformer-only.safetensors")
    assert err.value.input_name == "ckpt_name"
    assert "FLUX transformer without" in str(err.value) and "UNETLoader" in str(err.value)


def test_two_t5_files_in_dual_clip_loader_name_what_flux_needs(env):
    with pytest.raises(NodeError) as err:
        call(split_loaders.dual_clip_loader, env, clip_name1=SPLIT["t5xxl"], clip_name2=SPLIT["t5xxl"], type="flux")
    assert err.value.input_name in ("clip_name1", "clip_name2")
    assert "CLIP-L + T5-XXL" in str(err.value) and "tiny-t5xxl.safetensors (T5-XXL)" in str(err.value)


def test_damaged_bfl_file_names_family_and_keys(env, root):
    from safetensors.torch import save_file

    state = tiny_flux.bfl_transformer("dev")
    state.pop("double_blocks.0.img_attn.qkv.weight")
    state["double_blocks.0.surprise.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(root / "diffusion_models" / "broken-flux.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken-flux.safetensors")
    text = str(err.value)
    assert err.value.input_name == "unet_name"
    assert "FLUX" in text and "double_blocks.0.img_attn.qkv.weight" in text and "surprise" in text


def test_a_typed_size_not_a_multiple_of_16_is_refused_and_a_linked_one_floored_as_comfyui_does(registry, env):
    """Typed on EmptySD3LatentImage, 72 is a validation error naming the node and input; the same number
    through a link (GetImageSize of a 72-pixel picture, as OmniGen2's edit template wires it) makes the
    9-pixel latent ComfyUI makes."""
    from engine.validate import WorkflowInvalid, validate
    from nodes.flux_nodes import empty_sd3_latent_image

    typed = parse({"1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 72, "height": 64, "batch_size": 1}},
                   "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}})
    with pytest.raises(WorkflowInvalid) as err:
        validate(typed, registry, env)
    (error,) = err.value.errors
    assert (error.node_id, error.input_name) == ("1", "width") and "multiple of 16" in error.message
    (latent,) = call(empty_sd3_latent_image, env, width=72, height=64, batch_size=1)
    assert tuple(latent["samples"].shape) == (1, 16, 8, 9)


def test_guidance_on_schnell_is_reported_as_ignored(env):
    from nodes.flux_nodes import flux_guidance
    from nodes.sampling import ksampler

    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-schnell.safetensors")
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=SPLIT["clip_l"], clip_name2=SPLIT["t5xxl"],
                   type="flux")
    (cond,) = call(flux_guidance, env, conditioning=clip.encode(PROMPT), guidance=3.5)
    rec = Called()
    call(ksampler, env, rec, model=model, seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
         positive=cond, negative=cond, latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
    assert any("guidance 3.5 is ignored" in m and "schnell" in m for m in rec.messages)


def test_sd1_lora_on_flux_is_refused_naming_the_family(env, root):
    from safetensors.torch import save_file

    import tiny_models
    from nodes import lora

    # kohya's names of SD1 UNet and text-encoder modules (the shapes do not matter: nothing may match)
    state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4)}
    assert tiny_models.components("sd1")["unet"].down_blocks[0].attentions[0].proj_in is not None
    (root / "loras").mkdir(exist_ok=True)
    save_file(state, str(root / "loras" / "sd1-style.safetensors"))
    (model,) = call(split_loaders.unet_loader, env, unet_name=SPLIT["diffusion_model"])
    (clip,) = call(split_loaders.dual_clip_loader, env, clip_name1=SPLIT["clip_l"], clip_name2=SPLIT["t5xxl"],
                   type="flux")
    for kwargs in ({"clip": clip, "strength_clip": 1.0}, {}):
        spec = lora.lora_loader if kwargs else lora.lora_loader_model_only
        with pytest.raises(NodeError) as err:
            call(spec, env, model=model, lora_name="sd1-style.safetensors", strength_model=1.0, **kwargs)
        assert err.value.input_name == "lora_name" and "flux" in str(err.value)


def test_weight_dtype_fp8_stores_a_bf16_file_in_fp8(env):
    rec = Called()
    (model,) = call(split_loaders.unet_loader, env, rec, unet_name=SPLIT["diffusion_model"], weight_dtype="fp8_e4m3fn")
    with model.unet() as net:
        assert net.x_embedder.weight.dtype == torch.float8_e4m3fn
        assert net.norm_out.linear.weight.dtype == torch.float8_e4m3fn
    assert "fp8 weights kept fp8" in rec.messages[0]
    (plain,) = call(split_loaders.unet_loader, env, unet_name=SPLIT["diffusion_model"])
    with plain.unet() as net:  # a separate entry: the default load is untouched
        assert net.x_embedder.weight.dtype == torch.float32


def test_prompt_weights_apply_to_t5_tokens_and_not_to_the_pooled_text(env):
    """ComfyUI's rule on FLUX: a weighted T5 token is empty + (h - empty) * w, every other token and
    CLIP-L's pooled output are those of the prompt without its syntax (checked against the encoders
    called directly); an unweighted prompt is diffusers' encoding."""
    from nodes.text import clip_text_encode

    clip, = call(split_loaders.dual_clip_loader, env, clip_name1=SPLIT["clip_l"], clip_name2=SPLIT["t5xxl"],
                 type="flux")
    rec = Called()
    weighted, = call(clip_text_encode, env, rec, text="a (lighthouse:1.6) on a cliff", clip=clip)
    plain, = call(clip_text_encode, env, text=PROMPT, clip=clip)
    parts = tiny_flux.components("dev")
    tok, t5 = parts["tokenizer_2"], parts["text_encoder_2"]
    with torch.no_grad():
        embeds, pooled, _ = tiny_flux.pipeline("dev").encode_prompt(PROMPT, prompt_2=None, device="cpu",
                                                                     max_sequence_length=512)
        empty_ids = tok([""], padding="max_length", max_length=512, return_tensors="pt").input_ids
        empty = t5(empty_ids)[0]
    assert torch.allclose(plain[0][0], embeds, atol=1e-5)  # diffusers' own encoding, unweighted
    ids = tok(PROMPT).input_ids
    word = tok("lighthouse", add_special_tokens=False).input_ids
    start = ids.index(word[0])
    marked = torch.zeros(512, dtype=torch.bool)
    marked[start:start + len(word)] = True
    w_states, p_states = weighted[0][0][0], plain[0][0][0]
    expected = empty[0][marked] + (p_states[marked] - empty[0][marked]) * 1.6
    assert torch.allclose(w_states[marked], expected, atol=1e-4)
    assert torch.allclose(w_states[~marked], p_states[~marked], atol=1e-5)
    assert (w_states[marked] - p_states[marked]).abs().max() > 1e-3  # not vacuous: the weight changed them
    assert torch.equal(weighted[0][1]["pooled_output"], plain[0][1]["pooled_output"])
    assert torch.allclose(plain[0][1]["pooled_output"], pooled, atol=1e-5)
    assert not any("not applied" in m for m in rec.messages)
