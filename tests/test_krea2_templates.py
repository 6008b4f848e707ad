"""ComfyUI's Krea 2 templates (comfyui-workflow-templates-json), as its editor saved them.

``image_krea2_turbo_t2i`` and ``_int8`` validate with only their model files missing. With the
template's own prompt-enhance switch off and its TextGenerate node taken out, the rest of the graph runs
unchanged on the tiny files (UNETLoader with the bf16 / int8_convrot transformer, CLIPLoader type
krea2, VAELoader, the LoRA switch, EmptyLatentImage, KSampler euler/simple 8 steps cfg 1 with a
ConditioningZeroOut negative) and gives Krea2Pipeline's Turbo picture; with its LoRA switch on, the
picture of the pipeline with that LoRA merged by hand and the style words appended. As shipped
(prompt enhance on) it gives the pipeline's picture for the prompt TextGenerate wrote. The style-reference template
feeds a picture to TextEncodeQwenImageEditPlus on the Krea 2 CLIP, which Qwen3-VL's vision tower reads; it
runs on the tiny files and the picture changes the image.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_krea2
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, save_state, template_file_errors  # noqa: F401 (fixtures)

TEMPLATES = ("image_krea2_turbo_t2i.json", "image_krea2_turbo_t2i_int8.json")
STYLE = "image_krea2_turbo_int8_image_style_reference.json"
SIZE = 64
#: The LoRA the templates' LoraLoaderModelOnly gets here: a rank-2 delta on the first block's query.
LORA_DOWN = torch.randn(2, 64, generator=torch.Generator().manual_seed(8)) * 0.3
LORA_UP = torch.randn(64, 2, generator=torch.Generator().manual_seed(9)) * 0.3


def _template(name: str) -> dict:
    import comfyui_workflow_templates_json as module

    return json.loads((Path(module.__file__).parent / "templates" / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_int8_quant import quantise_int8

    root = tiny_krea2.make_models_folder(tmp_path_factory.mktemp("krea2-templates"))
    int8, _ = quantise_int8(tiny_krea2.original_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "tiny-krea2-int8_convrot.safetensors", int8)
    save_state(root / "loras" / "tiny-krea2-lora.safetensors", {
        "diffusion_model.blocks.0.attn.wq.lora_A.weight": LORA_DOWN,
        "diffusion_model.blocks.0.attn.wq.lora_B.weight": LORA_UP})
    return root


@pytest.mark.parametrize("name", [*TEMPLATES, STYLE])
def test_templates_validate_with_only_their_files_missing(registry, name, tmp_path):
    wf, files = template_file_errors(registry, _template(name), tmp_path)  # no unknown node type
    allowed = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
               ("LoraLoaderModelOnly", "lora_name"), ("LoadImage", "image")}
    assert files and files <= allowed, files
    clip = next(n for n in wf.nodes.values() if n.type == "CLIPLoader")
    assert clip.inputs["type"] == "krea2"  # Kiln's CLIPLoader takes the type (no value_not_in_list for it)


def _without_prompt_enhance(registry, name: str, unet: str) -> object:
    """The template with its prompt-enhance switch off and the TextGenerate node taken out (its switch
    input rewired to the prompt it would have enhanced), on the tiny files at 64x64."""
    wf = copy.deepcopy(parse_document(_template(name), registry))
    assert wf.nodes["30:16"].type == "TextGenerate" and wf.nodes["30:21"].type == "ComfySwitchNode"
    del wf.nodes["30:16"]
    wf.nodes["30:21"].inputs["on_true"] = wf.nodes["30:21"].inputs["on_false"]
    return wf.with_overrides({"30:24.value": False, "30:10.unet_name": unet,
                              "30:11.clip_name": "tiny-qwen3vl_4b.safetensors",
                              "30:12.vae_name": "tiny-qwen_image_vae.safetensors",
                              "30:15.lora_name": "tiny-krea2-lora.safetensors", "30:5.width": SIZE,
                              "30:5.height": SIZE})


@pytest.mark.parametrize("name,unet", [(TEMPLATES[0], "tiny-krea2.safetensors"),
                                       (TEMPLATES[1], "tiny-krea2-int8_convrot.safetensors")])
def test_turbo_templates_run_on_tiny_files_and_equal_krea2_pipeline(registry, env, name, unet):
    wf = _without_prompt_enhance(registry, name, unet)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["30:8"][0].numpy()
    prompt, seed = wf.nodes["30:19"].inputs["value"], wf.nodes["30:3"].inputs["seed"]
    pipe = tiny_krea2.pipeline(distilled=True)
    if "int8" in unet:  # the reference holds comfy-kitchen's dequantisation of the int8 file
        from test_int8_quant import quantise_int8

        from nodes.checkpoint.krea2_keys import original_to_diffusers

        _, twin = quantise_int8(tiny_krea2.original_state())
        pipe.transformer = copy.deepcopy(pipe.transformer)
        pipe.transformer.load_state_dict(original_to_diffusers(twin))
    with torch.no_grad():
        theirs = pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=0.0,
                      output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images
    gap = np.abs(ours - theirs).max()
    print(f"{name}: {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    other = Executor(registry, env).run(wf.with_overrides({"30:3.seed": seed + 1})).results["30:8"][0].numpy()
    assert np.abs(ours - other).max() > 0.02  # the seed matters: not vacuous


def test_the_turbo_templates_lora_switch_applies_its_lora_and_style_words(registry, env):
    """The template's second switch on: LoraLoaderModelOnly (strength 0.8) feeds KSampler and the style
    words are appended to the prompt; the pipeline with the LoRA merged by hand and the same words agrees."""
    wf = _without_prompt_enhance(registry, TEMPLATES[0], "tiny-krea2.safetensors").with_overrides({"30:23.value": True})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["30:8"][0].numpy()
    strength, words = wf.nodes["30:15"].inputs["strength_model"], wf.nodes["30:27"].inputs["string_b"]
    prompt = wf.nodes["30:19"].inputs["value"] + ", " + words
    pipe = tiny_krea2.pipeline(distilled=True)
    pipe.transformer = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].attn.to_q.weight += strength * LORA_UP @ LORA_DOWN
        theirs = pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=0.0,
                      output_type="np", generator=torch.Generator("cpu").manual_seed(wf.nodes["30:3"].inputs["seed"])
                      ).images
    assert np.abs(ours - theirs).max() <= 1 / 255
    off = Executor(registry, env).run(wf.with_overrides({"30:23.value": False})).results["30:8"][0].numpy()
    assert np.abs(ours - off).max() > 0.02  # the switch matters: not vacuous


def test_the_turbo_template_as_shipped_enhances_its_prompt_with_textgenerate(registry, env):
    """Prompt enhance on, as the template ships: TextGenerate samples a prompt on the Krea 2 Qwen3-VL itself
    (the system prompt and the user's words, seeded), the switch passes it on and the picture
    is Krea2Pipeline's for that generated prompt."""
    wf = parse_document(_template(TEMPLATES[0]), registry).with_overrides({
        "30:10.unet_name": "tiny-krea2.safetensors", "30:11.clip_name": "tiny-qwen3vl_4b.safetensors",
        "30:12.vae_name": "tiny-qwen_image_vae.safetensors", "30:15.lora_name": "tiny-krea2-lora.safetensors",
        "30:5.width": SIZE, "30:5.height": SIZE, "30:16.max_length": 24})
    assert wf.nodes["30:24"].inputs["value"] is True  # the template's prompt_enhance switch
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    enhanced = outcome.results["30:16"][0]
    assert enhanced and enhanced != wf.nodes["30:19"].inputs["value"]
    with torch.no_grad():
        theirs = tiny_krea2.pipeline(distilled=True)(
            prompt=enhanced, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=0.0, output_type="np",
            generator=torch.Generator("cpu").manual_seed(wf.nodes["30:3"].inputs["seed"])).images
    assert np.abs(outcome.results["30:8"][0].numpy() - theirs).max() <= 1 / 255


def _style_reference(registry, env, picture: np.ndarray) -> object:
    """The style-reference template with its TextGenerate taken out (its switch off, as the template ships),
    on the tiny files at 64x64, reading ``picture`` as its reference."""
    from PIL import Image

    Image.fromarray(picture).save(env.paths.input.root / "ref.png")
    wf = copy.deepcopy(parse_document(_template(STYLE), registry))
    assert wf.nodes["30:24"].inputs["value"] is False and wf.nodes["30:52"].type == "TextEncodeQwenImageEditPlus"
    del wf.nodes["30:16"]
    wf.nodes["30:21"].inputs["on_true"] = wf.nodes["30:21"].inputs["on_false"]
    for node in ("30:61", "30:64"):  # the latent and the shift at 64x64 (the template sizes them from the picture)
        wf.nodes[node].inputs.update(width=SIZE, height=SIZE)
    return wf.with_overrides({"30:10.unet_name": "tiny-krea2.safetensors",
                              "30:11.clip_name": "tiny-qwen3vl_4b.safetensors",
                              "30:12.vae_name": "tiny-qwen_image_vae.safetensors",
                              "30:15.lora_name": "tiny-krea2-lora.safetensors", "69.image": "ref.png"})


def test_style_reference_template_reads_its_picture_through_qwen3_vl(registry, env, root):
    """TextEncodeQwenImageEditPlus on the Krea 2 CLIP reads the reference picture with Qwen3-VL's vision tower
    (tests/test_qwen3vl_vision.py checks those states against transformers); the template runs on the tiny
    files and its picture changes the image."""
    rng = np.random.default_rng(3)
    first = Executor(registry, env).run(_style_reference(registry, env, rng.integers(0, 256, (32, 48, 3), np.uint8)))
    assert first.status == "succeeded", first.error and first.error.message
    ours = first.results["30:62"][0].numpy()
    assert ours.shape == (1, SIZE, SIZE, 3)
    second = Executor(registry, env).run(_style_reference(registry, env, rng.integers(0, 256, (32, 48, 3), np.uint8)))
    assert second.status == "succeeded", second.error and second.error.message
    assert np.abs(ours - second.results["30:62"][0].numpy()).max() > 1 / 255  # the picture matters: not vacuous
