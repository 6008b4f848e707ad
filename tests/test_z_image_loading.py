"""Z-Image from the files people have, through the real loader nodes, against diffusers' pipelines.

The tiny Z-Image (tests/tiny_z_image.py) is written in ComfyUI's split layout (original keys, with and
without ``model.diffusion_model.``; diffusers' keys in one file), Qwen3 as ``qwen_3_4b.safetensors`` and
as a diffusers folder. The shipped workflows run on the split files and equal ZImagePipeline /
ZImageImg2ImgPipeline within 1/255 per pixel; ComfyUI's image_z_image_turbo template runs through the
editor-format converter; wrong files get errors naming the input, the family and the keys.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux
import tiny_z_image
from engine.context import NodeError
from engine.workflow import load, parse
from flow_family_files import (checkpoint_loader, env, fp8_sampling_gap, models_root,  # noqa: F401 (env and
                               pipeline_images, registry, run, txt2img_graph, unet_weights)  # registry: fixtures)
from node_call import Called, call, environment_over
from nodes import loaders, split_loaders
from nodes.checkpoint import z_image_keys
from nodes.families import z_image

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse on a cliff"
NEGATIVE = "blurry, dark"
SIZE = 64
SPLIT = dict(diffusion_model="tiny-z-image.safetensors", text_encoder="tiny-qwen_3_4b.safetensors",
             vae="tiny-flux-ae.safetensors")


root = models_root(tiny_z_image.make_models_folder, "z-image-models")


def _reference(seed: int, steps: int, cfg: float, negative: str = NEGATIVE, **img2img) -> np.ndarray:
    """diffusers at Kiln's ``cfg`` (its guidance_scale is cfg - 1)."""
    from diffusers import ZImageImg2ImgPipeline

    return pipeline_images(tiny_z_image.pipeline, ZImageImg2ImgPipeline if img2img else None, prompt=PROMPT,
                           negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps,
                           guidance_scale=cfg - 1.0, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(seed), **img2img)


# -- loading -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(root, tmp_path_factory) -> dict:
    """The two diffusers folders through CheckpointLoaderSimple and DiffusersLoader, loaded once for every
    split file to be compared with: their handles, copies of their transformers' weights and of the
    checkpoint's text encoder."""
    with contextlib.contextmanager(environment_over)(root, tmp_path_factory.mktemp("folders")) as env:
        (folder, clip, _) = call(loaders.checkpoint_loader, env, ckpt_name="tiny-z-image-diffusers")
        (pipeline, _, _) = call(loaders.diffusers_loader, env, model_path="tiny-z-image")
        with clip.encoder("text_encoder") as te:
            text = {k: v.detach().clone() for k, v in te.state_dict().items()}
        return {"folder": folder, "pipeline": pipeline, "clip": clip, "whole": unet_weights(folder),
                "other": unet_weights(pipeline), "text_encoder": text}


@pytest.mark.parametrize("name", ["tiny-z-image.safetensors", "tiny-z-image-prefixed.safetensors",
                                  "tiny-z-image-diffusers-keys.safetensors"])
def test_split_files_and_diffusers_folders_load_the_same_weights_bit_for_bit(env, folders, name):
    rec = Called()
    (model,) = call(split_loaders.unet_loader, env, rec, unet_name=name)
    assert model.family is z_image.FAMILY and any("z-image UNet" in m for m in rec.messages)
    folder, pipeline, clip = folders["folder"], folders["pipeline"], folders["clip"]
    assert folder.family is pipeline.family is clip.family is z_image.FAMILY
    split, whole, other = unet_weights(model), folders["whole"], folders["other"]
    want = tiny_z_image.components()["transformer"].state_dict()
    assert set(split) == set(whole) == set(other) == set(want)
    assert all(torch.equal(split[k], want[k]) and torch.equal(whole[k], want[k]) and torch.equal(other[k], want[k])
               for k in want)
    (qwen,) = call(split_loaders.clip_loader, env, clip_name=SPLIT["text_encoder"], type="lumina2")
    assert qwen.family is z_image.FAMILY
    with qwen.encoder("text_encoder") as a:
        sa, sb = a.state_dict(), folders["text_encoder"]
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_key_map_matches_diffusers_converter_at_the_released_width():
    """Our map gives the keys and shapes diffusers' Z-Image converter gives, and the shapes give the
    release's config (built on meta: no memory)."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        big = ZImageTransformer2DModel(n_layers=2, n_refiner_layers=2)
    original = z_image_keys.diffusers_to_original(big.state_dict())
    assert "layers.1.attention.qkv.weight" in original and "final_layer.adaLN_modulation.1.weight" in original
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    ours = z_image_keys.original_to_diffusers(dict(original))
    assert set(theirs) == set(ours) == set(big.state_dict())
    assert all(theirs[k].shape == ours[k].shape for k in ours)
    config = z_image_keys.transformer_config({k: tuple(v.shape) for k, v in original.items()})
    assert (config["dim"], config["n_heads"], config["n_kv_heads"], config["cap_feat_dim"]) == (3840, 30, 30, 2560)
    assert config["axes_dims"] == [32, 48, 48] and config["n_refiner_layers"] == 2


def test_weight_dtype_fp8_keeps_fp8_linears_and_stays_close(env):
    import test_z_image

    gap = fp8_sampling_gap(env, SPLIT["diffusion_model"], test_z_image._clip(),
                           lambda net: net.layers[0].attention.to_q.weight, prompt=PROMPT, negative=NEGATIVE,
                           scheduler="simple")
    assert 0 < gap < 0.25  # 8-bit weights on a tiny random model: close, not equal


# -- graphs and workflows ------------------------------------------------------------------------


def test_diffusers_folder_graph_equals_z_image_pipeline(registry, env):
    """CheckpointLoaderSimple on the folder (its own tokenizer and scheduler config), API format."""
    graph = txt2img_graph(checkpoint_loader("tiny-z-image-diffusers"), prompt=PROMPT, negative=NEGATIVE, size=SIZE,
                          seed=8, steps=4, cfg=5.0, scheduler="simple", prefix="z")
    kiln = run(registry, env, parse(graph)).results["6"][0].numpy()
    assert np.abs(kiln - _reference(8, 4, 5.0)).max() <= 1 / 255
    assert np.abs(kiln - _reference(9, 4, 5.0)).max() > 0.02


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_txt2img_workflow_on_split_files_equals_z_image_pipeline(registry, env, cfg):
    """The shipped workflow (euler: diffusers has no res_multistep) at Turbo's cfg 1 and at cfg 4 with
    a negative prompt."""
    wf = load(REPO / "workflows" / "z-image-txt2img.json").with_overrides(
        dict(SPLIT, prompt=PROMPT, negative_prompt=NEGATIVE, cfg=cfg, width=SIZE, height=SIZE, steps=4, seed=3,
             sampler="euler"))
    kiln = run(registry, env, wf).results["8"][0].numpy()
    assert np.abs(kiln - _reference(3, 4, cfg)).max() <= 1 / 255
    other = _reference(3, 4, 2.5 if cfg > 1 else 1.0, negative="" if cfg == 1 else NEGATIVE)
    if cfg == 1:  # cfg 1 reads no negative: the same image without it
        assert np.abs(kiln - other).max() <= 1 / 255
        other = _reference(4, 4, 1.0)
    assert np.abs(kiln - other).max() > 0.01  # the seed (cfg 1) / cfg (4) matters: not vacuous


def test_img2img_workflow_on_split_files_equals_z_image_img2img_pipeline(registry, env):
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "init.png")
    outcomes = {}
    for strength in (0.6, 0.3):
        wf = load(REPO / "workflows" / "z-image-img2img.json").with_overrides(
            dict(SPLIT, prompt=PROMPT, negative_prompt=NEGATIVE, cfg=3.0, image="init.png", width=SIZE,
                 height=SIZE, strength=strength, steps=6, seed=7, sampler="euler"))
        outcomes[strength] = run(registry, env, wf)
    kiln = outcomes[0.6].results["11"][0].numpy()
    init = z_image.FAMILY.latent.to_model(outcomes[0.6].results["8"][0]["samples"])
    assert np.abs(kiln - _reference(7, 6, 3.0, image=init, strength=0.6)).max() <= 1 / 255
    assert np.abs(kiln - outcomes[0.3].results["11"][0].numpy()).max() > 0.02  # strength matters


def _editor_template(name: str) -> dict:
    import importlib
    import json

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    return json.loads((folder / name).read_text(encoding="utf-8"))


def test_comfyui_z_image_turbo_template_runs_and_equals_the_family(registry, env):
    """ComfyUI's image_z_image_turbo template (editor format, a subgraph): UNETLoader, CLIPLoader type
    lumina2, ModelSamplingAuraFlow 3, ConditioningZeroOut as the negative, KSampler res_multistep /
    simple, 8 steps, cfg 1. It equals the same sampling through the family directly on the tiny
    model's own parts; with euler it equals ZImagePipeline; the seed matters."""
    import test_z_image
    from engine.formats import parse_document

    base = {"57:28.unet_name": SPLIT["diffusion_model"], "57:30.clip_name": SPLIT["text_encoder"],
            "57:29.vae_name": SPLIT["vae"], "57:13.width": SIZE, "57:13.height": SIZE, "57:3.seed": 11}
    wf = parse_document(_editor_template("image_z_image_turbo.json"), registry).with_overrides(base)
    assert wf.nodes["57:30"].inputs["type"] == "lumina2" and wf.nodes["57:3"].inputs["sampler_name"] == "res_multistep"
    assert wf.nodes["57:11"].inputs["shift"] == 3 and wf.nodes["57:3"].inputs["cfg"] == 1
    ours = run(registry, env, wf).results["57:8"][0]
    text = wf.nodes["57:27"].inputs["text"]
    direct = test_z_image.kiln(text, "", 1.0, steps=8, seed=11, sampler="res_multistep")
    assert (ours - direct).abs().max() <= 1 / 255
    euler = run(registry, env, parse_document(_editor_template("image_z_image_turbo.json"), registry)
                .with_overrides(dict(base, **{"57:3.sampler_name": "euler"}))).results["57:8"][0]
    pipe = tiny_z_image.pipeline()
    with torch.no_grad():
        theirs = pipe(prompt=text, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=0.0,
                      output_type="pt", generator=torch.Generator("cpu").manual_seed(11)).images.permute(0, 2, 3, 1)
    assert (euler - theirs).abs().max() <= 1 / 255
    other = run(registry, env, parse_document(_editor_template("image_z_image_turbo.json"), registry)
                .with_overrides(dict(base, **{"57:3.seed": 12}))).results["57:8"][0]
    assert (ours - other).abs().max() > 0.02


# -- bad input ---------------------------------------------------------------------------------


def test_t5_as_z_images_text_encoder_names_what_it_needs(env):
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="tiny-t5xxl.safetensors", type="lumina2")
    assert err.value.input_name == "clip_name"
    assert "'lumina2' needs Qwen3" in str(err.value) and "tiny-t5xxl.safetensors (T5-XXL)" in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "foreign"])
def test_damaged_z_image_file_names_family_and_keys(env, root, damage):
    from safetensors.torch import save_file

    state = tiny_z_image.original_transformer()
    if damage == "missing":
        state.pop("layers.1.feed_forward.w2.weight")
        words = "layers.1.feed_forward.w2.weight"
    else:
        state["layers.1.attention.to_q.weight"] = torch.zeros(2)  # a diffusers name in an original-layout file
        words = "layers.1.attention.to_q.weight"
    name = f"broken-z-{damage}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "diffusion_models" / name))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name=name)
    text = str(err.value)
    assert err.value.input_name == "unet_name"
    assert name in text and "Z-Image" in text and words in text


def test_lumina2_and_all_in_one_files_say_what_they_are(env, root):
    from safetensors.torch import save_file

    state = {k: v for k, v in tiny_z_image.original_transformer().items() if not k.endswith("pad_token")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "diffusion_models" / "lumina2.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="lumina2.safetensors")
    assert err.value.input_name == "unet_name" and "Lumina Image 2.0" in str(err.value)
    (root / "checkpoints" / "tiny-z-aio.safetensors").write_bytes(
        (root / "diffusion_models" / "tiny-z-image-prefixed.safetensors").read_bytes())
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-z-aio.safetensors")
    assert err.value.input_name == "ckpt_name"
    assert "Z-Image transformer" in str(err.value) and "CLIPLoader (type lumina2)" in str(err.value)


def test_a_comfy_scaled_fp8_transformer_equals_its_dequantised_twin(env, root):
    """ComfyUI's scaled fp8 file (per-row scales on the fused qkv, split with it onto to_q/to_k/to_v):
    held fp8 with its scales, it samples what the dequantised float32 file samples."""
    import test_z_image
    from nodes.runtime.fp8 import weight_scale
    from nodes.sampling import ksampler
    from test_scaled_fp8 import quantise

    scaled, plain = quantise(tiny_z_image.original_transformer(), "model.diffusion_model.")
    tiny_flux._save(root / "diffusion_models" / "z-scaled.safetensors", scaled)
    tiny_flux._save(root / "diffusion_models" / "z-dequantised.safetensors", plain)
    clip = test_z_image._clip()
    out = {}
    for name in ("z-scaled.safetensors", "z-dequantised.safetensors"):
        (model,) = call(split_loaders.unet_loader, env, unet_name=name)
        if name == "z-scaled.safetensors":
            with model._use_unet() as net:
                k = net.layers[1].attention.to_k
                assert k.weight.dtype == torch.float8_e4m3fn and weight_scale(k) is not None
        (res,) = call(ksampler, env, model=model, seed=3, steps=3, cfg=3.0, sampler_name="euler", scheduler="simple",
                      positive=clip.encode(PROMPT), negative=clip.encode(NEGATIVE),
                      latent_image={"samples": torch.zeros(1, 16, 8, 8)}, denoise=1.0)
        out[name] = res["samples"]
    assert torch.allclose(out["z-scaled.safetensors"], out["z-dequantised.safetensors"], atol=1e-4)


def test_comfyui_z_image_base_template_with_cfg_equals_z_image_pipeline(registry, env):
    """ComfyUI's image_z_image template (Z-Image base: cfg 4 with an empty negative prompt, ResolutionSelector,
    SaveImageAdvanced) from its editor file, with euler for diffusers' sampler, equals ZImagePipeline at
    guidance_scale 3 on the size ResolutionSelector gives."""
    from engine.formats import parse_document

    wf = parse_document(_editor_template("image_z_image.json"), registry).with_overrides({
        "76:66.unet_name": SPLIT["diffusion_model"], "76:62.clip_name": SPLIT["text_encoder"],
        "76:63.vae_name": SPLIT["vae"], "94.megapixels": 0.1, "94.multiple": 16, "76:69.steps": 3,
        "76:69.seed": 13, "76:69.sampler_name": "euler"})
    assert wf.nodes["76:69"].inputs["cfg"] == 4 and wf.nodes["76:71"].inputs["text"] == ""
    ours = run(registry, env, wf).results["76:65"][0]
    _, h, w, _ = ours.shape
    assert h % 16 == 0 and w % 16 == 0 and h * w >= 0.1 * 1024 * 1024 * 0.9
    pipe = tiny_z_image.pipeline()
    with torch.no_grad():
        theirs = pipe(prompt=wf.nodes["76:67"].inputs["text"], negative_prompt="", height=h, width=w,
                      num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                      generator=torch.Generator("cpu").manual_seed(13)).images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= 1 / 255
    with torch.no_grad():
        unguided = pipe(prompt=wf.nodes["76:67"].inputs["text"], height=h, width=w, num_inference_steps=3,
                        guidance_scale=0.0, output_type="pt",
                        generator=torch.Generator("cpu").manual_seed(13)).images.permute(0, 2, 3, 1)
    assert (ours - unguided).abs().max() > 0.01  # the template's cfg 4 matters
