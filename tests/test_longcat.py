"""LongCat-Image on a tiny random model, from ComfyUI's split files through the real loaders, against
diffusers' LongCatImagePipeline.

The tiny LongCat-Image (tests/tiny_longcat.py) is written as ComfyUI's files: the transformer in the
original FLUX-style layout (bare and under ``model.diffusion_model.``) and in diffusers', Qwen2.5-VL as
ComfyUI's qwen_2.5_vl file, FLUX's VAE in the ae layout. The graph (UNETLoader, CLIPLoader type
longcat_image, VAELoader, KSampler euler/simple with a negative prompt at cfg > 1) equals the pipeline's
images within 1/255 per pixel, with the pipeline's prompt rewriting and CFG renorm off (ComfyUI does
neither in the model: its template's CFGNorm node is another rule, tests/test_longcat_templates.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_longcat
from engine.workflow import parse
from flow_family_files import (env, models_root, registry, run, same_state, save_state,  # noqa: F401 (fixtures)
                               unet_weights)
from node_call import call
from nodes import split_loaders
from nodes.checkpoint import longcat_keys
from nodes.families import longcat

PROMPT = 'a sign that says "OPEN 24h", a cat\'s shadow'
NEGATIVE = "blurry, dark"
SIZE = 64
UNET, CLIP, VAE = tiny_longcat.UNET, tiny_longcat.CLIP, tiny_longcat.VAE



def _make(folder):
    """The tiny files, plus fp8_scaled and int8_convrot transformers and an fp8_scaled text encoder, each
    with a twin holding its dequantised weights (tests/test_scaled_fp8.py, tests/test_int8_quant.py)."""
    import tiny_qwen_image
    from test_int8_quant import quantise_int8
    from test_scaled_fp8 import quantise

    root = tiny_longcat.make_models_folder(folder)
    for stem, (quant, twin) in (("fp8", quantise(tiny_longcat.original_state(), "model.diffusion_model.")),
                                ("int8", quantise_int8(tiny_longcat.original_state(), "model.diffusion_model."))):
        save_state(root / "diffusion_models" / f"longcat-{stem}.safetensors", quant)
        save_state(root / "diffusion_models" / f"longcat-{stem}-dequant.safetensors", twin)
    scaled, plain = quantise(tiny_qwen_image.comfy_text_state())
    save_state(root / "text_encoders" / "qwen25vl-fp8_scaled.safetensors", scaled)
    save_state(root / "text_encoders" / "qwen25vl-dequant.safetensors", plain)
    return root


root = models_root(_make, "longcat-models")


def _reference(prompt: str, seed: int, steps: int, guidance: float, negative: str) -> np.ndarray:
    with torch.no_grad():
        return tiny_longcat.pipeline()(
            prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps,
            guidance_scale=guidance, output_type="np", generator=torch.Generator("cpu").manual_seed(seed),
            enable_cfg_renorm=False, enable_prompt_rewrite=False).images


def graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, unet: str = UNET, clip: str = CLIP,
          clip_type: str = "longcat_image") -> dict:
    """The template's graph without its CFGNorm: UNETLoader, CLIPLoader, VAELoader, two prompts through
    FluxGuidance (which LongCat ignores), EmptySD3LatentImage, KSampler euler/simple."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": clip_type}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}},
        "10": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 4.0}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["10", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "longcat"}},
    }


def _run(registry, env, g: dict) -> np.ndarray:
    return run(registry, env, parse(g)).results["6"][0].numpy()


# -- loading ------------------------------------------------------------------------------------------


def test_key_table_round_trips_and_tells_longcat_from_flux():
    original = tiny_longcat.original_state()
    want = tiny_longcat.transformer().state_dict()
    ours = longcat_keys.original_to_diffusers(original)
    assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want)
    back = longcat_keys.diffusers_to_original(ours)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    from diffusers import OvisImageTransformer2DModel

    from nodes.checkpoint.ovis_keys import diffusers_to_original

    assert longcat_keys.is_original(original) and not longcat_keys.is_original({**original, longcat_keys.FLUX_ONLY: 0})  # FLUX.1
    ovis = OvisImageTransformer2DModel(in_channels=64, out_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                       axes_dims_rope=(4, 6, 6)).state_dict()
    # Ovis-Image is FLUX-like too, without vector_in: its gated MLPs tell it apart, in either layout
    assert not longcat.FAMILY.claims_unet(diffusers_to_original(ovis)) and not longcat.FAMILY.claims_unet(ovis)
    assert longcat.FAMILY.claims_unet({"model.diffusion_model." + k: () for k in original})


@pytest.mark.parametrize("name", [UNET, "tiny-longcat_image-prefixed.safetensors",
                                  "tiny-longcat_image-diffusers-keys.safetensors"])
def test_unet_loader_detects_longcat_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is longcat.FAMILY and model.scheduler_config["max_shift"] == 1.15
    assert same_state(unet_weights(model), tiny_longcat.components()["transformer"].state_dict())


def test_conditioning_is_the_pipelines_encode_prompt(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="longcat_image")
    assert clip.family is longcat.FAMILY
    pipe = tiny_longcat.pipeline()
    for prompt in (PROMPT, "", "‘quoted’ and “more”"):
        ((ours, extra),) = clip.encode(prompt)
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(prompt=prompt)
        assert ours.shape == theirs.shape == (1, longcat.MAX_TOKENS, tiny_longcat.TEXT)
        assert torch.allclose(ours, theirs.float(), atol=1e-5), prompt
    assert not torch.allclose(clip.encode(PROMPT)[0][0], clip.encode(NEGATIVE)[0][0])


def test_quoted_spans_are_read_a_character_at_a_time():
    assert longcat.split_quoted("say 'hi' don't \"x y\"") == [
        ("say ", False), ("'hi'", True), (" don't ", False), ('"x y"', True)]
    tok = tiny_longcat.components()["tokenizer"]
    assert longcat.prompt_tokens(tok, '"ab"') == [tok(c, add_special_tokens=False)["input_ids"][0] for c in '"ab"']
    ids, mask, keep = longcat.prompt_inputs(tok, longcat.PREFIX + "a cat" + longcat.SUFFIX)  # a raw template
    assert bool(mask.all()) and tok.decode(ids[0, keep]) == "a cat"
    ids, mask, keep = longcat.prompt_inputs(tok, "a cat")
    assert ids.shape[1] == keep.stop + 5 and int(mask[0, keep].sum()) == 2 and tok.decode(ids[0, keep][:2]) == "a cat"


def test_quantised_files_load_to_their_dequantised_twins(env):
    from test_int8_quant import _compare as compare_int8
    from test_scaled_fp8 import _compare

    (a,) = call(split_loaders.unet_loader, env, unet_name="longcat-fp8.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="longcat-fp8-dequant.safetensors")
    assert a.family is longcat.FAMILY
    with a.unet() as x, b.unet() as y:
        layers, _ = _compare(x, y)
    assert layers >= 8  # every block's linears, renamed with their scales (the fused qkv split)
    (a,) = call(split_loaders.unet_loader, env, unet_name="longcat-int8.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="longcat-int8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        assert compare_int8(x, y)
    (c,) = call(split_loaders.clip_loader, env, clip_name="qwen25vl-fp8_scaled.safetensors", type="longcat_image")
    (d,) = call(split_loaders.clip_loader, env, clip_name="qwen25vl-dequant.safetensors", type="longcat_image")
    assert torch.allclose(c.encode(PROMPT)[0][0], d.encode(PROMPT)[0][0], atol=1e-4)


# -- parity with LongCatImagePipeline -------------------------------------------------------------------


def test_graph_equals_the_pipeline_and_the_seed_matters(registry, env):
    ours = _run(registry, env, graph(PROMPT, NEGATIVE, seed=5, steps=3, cfg=4.0))
    theirs = _reference(PROMPT, seed=5, steps=3, guidance=4.0, negative=NEGATIVE)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1 / 255
    other = _reference(PROMPT, seed=6, steps=3, guidance=4.0, negative=NEGATIVE)
    assert np.abs(other - theirs).max() > 0.05
    prompt = _reference("a red square", seed=5, steps=3, guidance=4.0, negative=NEGATIVE)
    assert np.abs(prompt - theirs).max() > 0.05


# -- bad input ---------------------------------------------------------------------------------------------


def _read(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _failure(registry, env, g: dict) -> tuple:
    from engine.executor import Executor

    outcome = Executor(registry, env).run(parse(g))
    assert outcome.status == "failed"
    return outcome.error.node_id, outcome.error.input_name, outcome.error.message


def test_bad_inputs_name_the_node_and_input(registry, env, root):
    import tiny_flux

    from nodes.checkpoint.load import CheckpointError, load_checkpoint

    tiny_flux._save(root / "text_encoders" / "tiny-clip_l.safetensors", tiny_flux.clip_l_state())
    node, name, message = _failure(registry, env, graph(PROMPT, NEGATIVE, 1, 1, 4.0, clip="tiny-clip_l.safetensors"))
    assert (node, name) == ("8", "clip_name") and "longcat_image" in message and "Qwen2.5-VL" in message
    node, name, message = _failure(registry, env, graph(PROMPT, NEGATIVE, 1, 1, 4.0, clip_type="qwen_image"))
    assert node == "5" and name in ("positive", "negative") and "type longcat_image" in message
    tiny_flux._save(root / "diffusion_models" / "te-as-unet.safetensors", _read(root / "text_encoders" / CLIP))
    node, name, message = _failure(registry, env, graph(PROMPT, NEGATIVE, 1, 1, 4.0, unet="te-as-unet.safetensors"))
    assert (node, name) == ("1", "unet_name") and "CLIPLoader" in message
    tiny_flux._save(root / "diffusion_models" / "flux1-dev.safetensors", tiny_flux.bfl_transformer("dev"))
    node, name, message = _failure(registry, env, graph(PROMPT, NEGATIVE, 1, 1, 4.0, unet="flux1-dev.safetensors"))
    assert node == "5" and name in ("positive", "negative") and "FLUX" in message
    with pytest.raises(CheckpointError, match="LongCat-Image transformer.*UNETLoader.*type longcat_image"):
        load_checkpoint(root / "diffusion_models" / UNET, torch.float32)
    net = longcat.FAMILY.wrap_network(tiny_longcat.components()["transformer"])
    with pytest.raises(longcat.ConditioningError) as err:
        net(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), torch.zeros(1, 7, 4096))
    assert err.value.input_name == "positive" and "type longcat_image" in str(err.value)


# -- LongCat-Image-Edit ----------------------------------------------------------------------------------


def edit_graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, picture: str) -> dict:
    """The Edit template's graph: the picture through TextEncodeQwenImageEdit (with the VAE: its latent is the
    reference) for both prompts, FluxKontextMultiReferenceLatentMethod index, VAEEncode for the latent's size."""
    g = graph(prompt, negative, seed, steps, cfg)
    g["11"] = {"class_type": "LoadImage", "inputs": {"image": picture}}
    for node, text in (("2", prompt), ("3", negative)):
        g[node] = {"class_type": "TextEncodeQwenImageEdit",
                   "inputs": {"clip": ["8", 0], "prompt": text, "vae": ["9", 0], "image": ["11", 0]}}
    g["10"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
               "inputs": {"conditioning": ["2", 0], "reference_latents_method": "index"}}
    g["12"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
               "inputs": {"conditioning": ["3", 0], "reference_latents_method": "index"}}
    g["4"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["9", 0]}}
    g["5"]["inputs"]["negative"] = ["12", 0]
    return g


def test_edit_graph_equals_the_edit_pipeline_and_the_picture_matters(registry, env, monkeypatch):
    import tiny_qwen_image_edit

    tiny_longcat.shrink_edit_area(monkeypatch)
    edit = "make it blue"
    from PIL import Image

    pictures = [tiny_qwen_image_edit.picture(4, SIZE, SIZE), Image.new("RGB", (SIZE, SIZE), (250, 250, 250))]
    for k, picture in enumerate(pictures):
        picture.save(env.paths.input.root / f"edit{k}.png")
    ours = _run(registry, env, edit_graph(edit, "", seed=2, steps=3, cfg=4.5, picture="edit0.png"))
    with torch.no_grad():
        theirs = tiny_longcat.edit_pipeline()(
            image=pictures[0], prompt=edit, negative_prompt="", num_inference_steps=3, guidance_scale=4.5,
            output_type="np", generator=torch.Generator("cpu").manual_seed(2)).images
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    gap = np.abs(ours - theirs).max()
    print(f"edit: {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    other = _run(registry, env, edit_graph(edit, "", seed=2, steps=3, cfg=4.5, picture="edit1.png"))
    print(f"another picture: {np.abs(other - ours).max() * 255:.4f}/255")
    # the picture matters, by far more than the parity gap (the tiny VAE's latents of two pictures differ little)
    assert np.abs(other - ours).max() > max(0.5 / 255, 100 * gap)


def test_edit_conditioning_is_the_edit_pipelines_encode_prompt(env, monkeypatch):
    import tiny_qwen_image_edit

    tiny_longcat.shrink_edit_area(monkeypatch)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="longcat_image")
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions

    full, vision = longcat.edit_pictures(tiny_qwen_image_edit.picture(4, 80, 48))
    assert full.size == calculate_dimensions(tiny_longcat.SMALL_AREA, 80 / 48) == (96, 64) and vision.size == (48, 32)
    assert longcat.edit_sizes(1000, 1000, 1024 * 1024) == (1024, 1024)  # the release's area
    ((ours, _),) = longcat.encode_picture(clip, PROMPT, vision)
    with torch.no_grad():
        theirs, _ = tiny_longcat.edit_pipeline().encode_prompt(prompt=[PROMPT], image=vision)
    assert ours.shape == theirs.shape and ours.shape[1] > longcat.MAX_TOKENS  # the picture's tokens kept
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_a_diffusers_folder_loads_through_checkpoint_loader(env, root):
    from nodes import loaders

    folder = root / "checkpoints" / "tiny-longcat-diffusers"
    if not folder.is_dir():
        tiny_longcat.pipeline().save_pretrained(str(folder), safe_serialization=True)
    model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=folder.name)
    assert model.family is clip.family is longcat.FAMILY and model.scheduler_config["base_shift"] == 0.5
    assert same_state(unet_weights(model), tiny_longcat.components()["transformer"].state_dict())
    with torch.no_grad():
        theirs, _ = tiny_longcat.pipeline().encode_prompt(prompt=PROMPT)
    assert torch.allclose(clip.encode(PROMPT)[0][0], theirs.float(), atol=1e-5)


# -- LoRAs ------------------------------------------------------------------------------------------------

#: Original-layout modules a ComfyUI LoRA names: fused ones (qkv, linear1), the time embedder, the text input.
LORA_MODULES = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "time_in.in_layer", "txt_in",
                "double_blocks.0.txt_mlp.0")


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_a_lora_in_the_original_layout_equals_the_weights_merged_by_hand(env, root, fmt):
    """Deltas on the original names (fused q/k/v and linear1 spread row-wise) through LoraLoaderModelOnly equal
    the deltas added to the original state dict by hand, converted by the key table."""
    from flow_family_lora import assert_lora_equals_merged, lora_file, merged_in_layout, random_factors, sample

    from nodes import loaders

    original = tiny_longcat.original_state()
    factors = random_factors([(m, tuple(original[m + ".weight"].shape)) for m in LORA_MODULES], seed=44)
    save_state(root / "loras" / f"longcat-{fmt}.safetensors", lora_file(factors, fmt))
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="longcat_image")
    (vae,) = call(loaders.vae_loader, env, vae_name=VAE)

    def pictures(model):
        return sample(env, model, clip, vae.decode, steps=2, cfg=3.0, scheduler="simple", latent=(1, 16, 8, 8))

    assert_lora_equals_merged(env, UNET, f"longcat-{fmt}.safetensors", pictures, lambda strength: merged_in_layout(
        longcat.FAMILY, tiny_longcat.components()["transformer"], original, factors, strength,
        longcat_keys.original_to_diffusers))
