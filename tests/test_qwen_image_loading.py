"""Qwen-Image from the files people have, through the real loader nodes, against diffusers' pipelines.

The tiny Qwen-Image (tests/tiny_qwen_image.py) is written as ComfyUI's split files (transformer with and
without ``model.diffusion_model.``, Qwen2.5-VL with its vision tower, the VAE in the Wan layout) and as
a diffusers folder. Graphs on either equal QwenImagePipeline within 1/255 per pixel; wrong files get
errors naming the family and keys.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_qwen_image
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run, txt2img_graph  # noqa: F401 (fixtures)
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint import qwen_image_vae
from nodes.families import qwen_image

PROMPT = "a lighthouse on a cliff"
NEGATIVE = "blurry, dark"
SIZE = 64
SPLIT = dict(unet="tiny-qwen_image.safetensors", clip="tiny-qwen_2.5_vl.safetensors",
             vae="tiny-qwen_image_vae.safetensors")


root = models_root(tiny_qwen_image.make_models_folder, "qwen-image-models")


def _reference(seed: int, steps: int, cfg: float) -> np.ndarray:
    with torch.no_grad():
        return tiny_qwen_image.pipeline()(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
            true_cfg_scale=cfg, output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images


def _graph(loaders: dict, seed: int, cfg: float, steps: int = 4) -> dict:
    return txt2img_graph(loaders, prompt=PROMPT, negative=NEGATIVE, size=SIZE, seed=seed, steps=steps, cfg=cfg,
                         scheduler="normal", prefix="qwen")


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["6"][0].numpy()


SPLIT_LOADERS = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["unet"], "weight_dtype": "default"}},
    "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": SPLIT["clip"], "type": "qwen_image"}},
    "9": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
    "_model": ["1", 0], "_clip": ["8", 0], "_vae": ["9", 0]}
FOLDER_LOADERS = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-qwen-image-diffusers"}},
    "_model": ["1", 0], "_clip": ["1", 1], "_vae": ["1", 2]}


@pytest.mark.parametrize("loaders", [SPLIT_LOADERS, FOLDER_LOADERS], ids=["split-files", "diffusers-folder"])
def test_graph_equals_qwen_image_pipeline(registry, env, loaders):
    kiln = _run(registry, env, _graph(loaders, 3, 4.0))
    gap = np.abs(kiln - _reference(3, 4, 4.0)).max()
    print(f"graph gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(kiln - _reference(4, 4, 4.0)).max() > 0.02  # the seed matters: not vacuous


@pytest.mark.parametrize("name", ["tiny-qwen_image.safetensors", "tiny-qwen_image-prefixed.safetensors"])
def test_split_transformer_loads_the_same_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is qwen_image.FAMILY
    want = tiny_qwen_image.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_vae_layout_is_diffusers_converters_and_round_trips():
    """Kiln's Wan-layout map gives exactly the names diffusers' Wan converter gives."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    want = tiny_qwen_image.components()["vae"].state_dict()
    original = qwen_image_vae.to_original(want)
    assert "decoder.upsamples.4.shortcut.weight" in original and "conv1.weight" in original
    assert set(convert_wan_vae_to_diffusers(dict(original))) == set(qwen_image_vae.to_diffusers(original)) == set(want)


def test_fp8_weight_dtype_keeps_fp8_linears(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name=SPLIT["unet"], weight_dtype="fp8_e4m3fn")
    with model._use_unet() as net:
        assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.extra.get("fp8")


def test_wrong_files_name_the_family_and_keys(env, root):
    from safetensors.torch import save_file

    from engine.context import NodeError

    state = {k: v.contiguous() for k, v in tiny_qwen_image.components()["transformer"].state_dict().items()}
    del state["transformer_blocks.1.attn.to_q.weight"]
    save_file(state, str(root / "diffusion_models" / "broken-qwen_image.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken-qwen_image.safetensors")
    assert "Qwen-Image transformer" in str(err.value) and "transformer_blocks.1.attn.to_q.weight" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name=SPLIT["clip"], type="flux")
    assert "Qwen2.5-VL" in str(err.value)
    vae = qwen_image_vae.to_original(tiny_qwen_image.components()["vae"].state_dict())
    del vae["decoder.upsamples.5.residual.2.weight"]
    save_file({k: v.contiguous() for k, v in vae.items()}, str(root / "vae" / "broken-qwen_image_vae.safetensors"))
    with pytest.raises(NodeError) as err:
        call(loaders.vae_loader, env, vae_name="broken-qwen_image_vae.safetensors")
    assert err.value.input_name == "vae_name" and "Qwen-Image VAE" in str(err.value)
    assert "decoder.upsamples.5.residual.2.weight" in str(err.value)  # the file's own name for it
    text = tiny_qwen_image.comfy_text_state()
    del text["model.layers.1.mlp.up_proj.weight"]
    save_file(text, str(root / "text_encoders" / "broken-qwen_2.5_vl.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="broken-qwen_2.5_vl.safetensors", type="qwen_image")
    assert "Qwen-Image text encoder" in str(err.value) and "layers.1.mlp.up_proj.weight" in str(err.value)
    save_file(state, str(root / "checkpoints" / "qwen_image_as_checkpoint.safetensors"))
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="qwen_image_as_checkpoint.safetensors")
    assert "Qwen-Image transformer" in str(err.value) and "UNETLoader" in str(err.value)


# -- ComfyUI's own template and Kiln's workflows ------------------------------------------------------


def _of_type(wf, node_type: str) -> list:
    return [n for n in wf.nodes.values() if n.type == node_type]


@pytest.mark.parametrize("template", ["image_qwen_image.json", "image_qwen_Image_2512.json"])
def test_comfyui_qwen_image_template_equals_pipeline_at_its_fixed_shift(registry, env, root, template):
    """ComfyUI's Qwen-Image templates (comfyui-workflow-templates-json; subgraphs, editor format) through
    Kiln's converter on the tiny split files: ModelSamplingAuraFlow shift 3.1, KSampler euler/simple,
    cfg 4, the Lightning LoRA switched off. Each equals QwenImagePipeline with the same fixed shift."""
    import importlib
    import json
    from pathlib import Path

    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    from engine.formats import parse_document
    from engine.workflow import Link

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    wf = parse_document(json.loads((folder / template).read_text(encoding="utf-8")), registry)
    (lora_node,) = _of_type(wf, "LoraLoaderModelOnly")
    (root / "loras").mkdir(exist_ok=True)  # the switched-off LoRA must exist to validate; it never loads
    save_file({}, str(root / "loras" / lora_node.inputs["lora_name"]))
    (unet,), (clip,), (vae,) = (_of_type(wf, t) for t in ("UNETLoader", "CLIPLoader", "VAELoader"))
    (latent,), (sampler,), (shift,) = (_of_type(wf, t) for t in ("EmptySD3LatentImage", "KSampler",
                                                                  "ModelSamplingAuraFlow"))
    assert clip.inputs["type"] == "qwen_image" and round(float(shift.inputs["shift"]), 4) == 3.1
    assert sampler.inputs["sampler_name"] == "euler" and sampler.inputs["scheduler"] == "simple"
    unet.inputs["unet_name"], clip.inputs["clip_name"], vae.inputs["vae_name"] = SPLIT["unet"], SPLIT["clip"], \
        SPLIT["vae"]
    latent.inputs.update(width=SIZE, height=SIZE)
    sampler.inputs.update(seed=11, steps=4, cfg=4.0)  # the switches' primitives, set directly
    pos, neg = (wf.nodes[sampler.inputs[k].node_id] for k in ("positive", "negative"))
    pos.inputs["text"], neg.inputs["text"] = PROMPT, NEGATIVE
    assert isinstance(pos.inputs["clip"], Link)
    outcome = run(registry, env, wf)
    (save,) = _of_type(wf, "SaveImage")
    ours = outcome.results[save.inputs["images"].node_id][0].numpy()
    pipe = tiny_qwen_image.pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.1,
                                                                 use_dynamic_shifting=False, shift_terminal=None)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=4,
                      true_cfg_scale=4.0, output_type="np", generator=torch.Generator("cpu").manual_seed(11)).images
    gap = np.abs(ours - theirs).max()
    print(f"template gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _reference(11, 4, 4.0)).max() > 0.01  # the shift matters: not vacuous


WF_FILES = dict(diffusion_model=SPLIT["unet"], text_encoder=SPLIT["clip"], vae=SPLIT["vae"])


def test_txt2img_workflow_on_split_files_equals_pipeline(registry, env):
    from pathlib import Path

    from engine.workflow import load

    wf = load(Path(__file__).resolve().parent.parent / "workflows" / "qwen-image-txt2img.json").with_overrides(
        dict(WF_FILES, prompt=PROMPT, negative_prompt=NEGATIVE, cfg=4.0, width=SIZE, height=SIZE, steps=4, seed=3))
    outcome = run(registry, env, wf)
    kiln = outcome.results["8"][0].numpy()
    assert np.abs(kiln - _reference(3, 4, 4.0)).max() <= 1 / 255
    assert np.abs(kiln - _reference(3, 4, 1.5)).max() > 0.01  # cfg matters: not vacuous


def test_img2img_workflow_on_split_files_equals_img2img_pipeline(registry, env):
    from pathlib import Path

    from diffusers import QwenImageImg2ImgPipeline

    from engine.workflow import load
    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "init.png")
    outcomes = {}
    for strength in (0.6, 0.3):
        wf = load(Path(__file__).resolve().parent.parent / "workflows" / "qwen-image-img2img.json").with_overrides(
            dict(WF_FILES, prompt=PROMPT, negative_prompt=NEGATIVE, cfg=3.0, image="init.png", width=SIZE,
                 height=SIZE, strength=strength, steps=6, seed=7))
        outcomes[strength] = run(registry, env, wf)
    kiln = outcomes[0.6].results["11"][0].numpy()
    init = qwen_image.FAMILY.latent.to_model(outcomes[0.6].results["8"][0]["samples"])
    pipe = tiny_qwen_image.pipeline(QwenImageImg2ImgPipeline)
    pipe.image_processor.preprocess = lambda image, **_: image  # a 16-channel latent passes through
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=init, strength=0.6, height=SIZE, width=SIZE,
                      num_inference_steps=6, true_cfg_scale=3.0, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(7)).images
    assert np.abs(kiln - theirs).max() <= 1 / 255
    assert np.abs(kiln - outcomes[0.3].results["11"][0].numpy()).max() > 0.02  # strength matters


# -- Comfy's scaled fp8 files ------------------------------------------------------------------------


def test_scaled_fp8_transformer_and_text_encoder_equal_their_dequantised_twins(env, root):
    """qwen_image_fp8_e4m3fn-style scaled transformers and qwen_2.5_vl_7b_fp8_scaled text encoders: fp8
    linears kept fp8 with their file's scales, computing as the dequantised file does."""
    from safetensors.torch import save_file
    from test_scaled_fp8 import _compare, quantise

    unet = tiny_qwen_image.components()["transformer"].state_dict()
    scaled, plain = quantise(unet, "model.diffusion_model.")
    save_file(scaled, str(root / "diffusion_models" / "qwen-scaled.safetensors"))
    save_file(plain, str(root / "diffusion_models" / "qwen-dequant.safetensors"))
    text = tiny_qwen_image.comfy_text_state()
    scaled, plain = quantise(text)  # the vision tower's linears too (Qwen-Image-Edit reads pictures with it)
    save_file(scaled, str(root / "text_encoders" / "qwen-vl-scaled.safetensors"))
    save_file(plain, str(root / "text_encoders" / "qwen-vl-dequant.safetensors"))
    (a,) = call(split_loaders.unet_loader, env, unet_name="qwen-scaled.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="qwen-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers, _ = _compare(x, y)
    assert layers >= 10
    (c,) = call(split_loaders.clip_loader, env, clip_name="qwen-vl-scaled.safetensors", type="qwen_image")
    (d,) = call(split_loaders.clip_loader, env, clip_name="qwen-vl-dequant.safetensors", type="qwen_image")
    with c.encoder("text_encoder") as x, d.encoder("text_encoder") as y:
        _compare(x, y)
    sc, sd = c.encode(PROMPT)[0][0], d.encode(PROMPT)[0][0]
    assert torch.allclose(sc, sd, atol=1e-4)
    from nodes.qwen_edit_nodes import text_encode_qwen_image_edit

    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    (ec,), (ed,) = (call(text_encode_qwen_image_edit, env, clip=x, prompt=PROMPT, image=image) for x in (c, d))
    assert torch.allclose(ec[0][0], ed[0][0], atol=1e-4)
