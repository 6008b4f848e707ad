"""ComfyUI's Qwen-Image-Edit templates (image_qwen_image_edit_2509.json, _2511.json) through Kiln's
editor-format converter on the tiny split files (tests/test_qwen_image_edit.py writes them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_qwen_image_edit
from engine.executor import Executor
from engine.registry import default_registry
from node_call import environment_over
from nodes.families import flux_references
from test_qwen_image_edit import FILES, save_split_files


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_split_files(tmp_path_factory.mktemp("qwen-edit-template-models"))


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.mark.parametrize("template", ["image_qwen_image_edit_2509.json", "image_qwen_image_edit_2511.json"])
def test_comfyui_edit_templates_run(registry, env, root, template, monkeypatch):
    """ComfyUI's image_qwen_image_edit_2509.json and _2511.json (subgraphs; FluxKontextImageScale,
    VAEEncode, TextEncodeQwenImageEditPlus twice, CFGNorm, ModelSamplingAuraFlow, the Lightning LoRA
    switched off; 2511 with two pictures and index_timestep_zero) run on the tiny files. ComfyUI
    samples them with plain CFG and CFGNorm, not diffusers' rule, so they are checked for running
    and for their pictures reaching both encoders as reference latents, not against the pipeline
    (tests/test_qwen_image_edit.py shows what pictures and references do). The pictures are kept
    small: FluxKontextImageScale picks among small sizes and the Edit nodes read at a small area
    (the nodes' rules at their real sizes are tested in test_flux_kontext.py and test_qwen_image_edit.py)."""
    import importlib

    from safetensors.torch import save_file

    from engine.formats import parse_document

    from nodes import kontext

    tiny_qwen_image_edit.shrink_picture_area(monkeypatch)
    monkeypatch.setattr(kontext, "KONTEXT_SIZES", ((64, 64), (96, 64), (64, 96)))
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    document = json.loads((folder / template).read_text(encoding="utf-8"))
    wf = parse_document(document, registry)
    of = lambda t: [n for n in wf.nodes.values() if n.type == t]  # noqa: E731
    (unet,), (clip,), (vae,), (lora,) = (of(t) for t in ("UNETLoader", "CLIPLoader", "VAELoader",
                                                          "LoraLoaderModelOnly"))
    (sampler,), (lightning,) = of("KSampler"), of("PrimitiveBoolean")
    lightning.inputs["value"] = False  # the switches' choice: the template's full-step path, no LoRA
    assert len(of("TextEncodeQwenImageEditPlus")) == 2
    (root / "loras").mkdir(exist_ok=True)  # the switched-off LoRA must exist to validate; it never loads
    save_file({}, str(root / "loras" / lora.inputs["lora_name"]))
    unet.inputs["unet_name"], clip.inputs["clip_name"], vae.inputs["vae_name"] = \
        FILES["unet"], FILES["clip"], FILES["vae"]
    for k, load in enumerate(of("LoadImage")):
        tiny_qwen_image_edit.picture(k, 96, 80).save(env.paths.input.root / f"in{k}.png")
        load.inputs["image"] = f"in{k}.png"
    sampler.inputs.update(seed=4, steps=2, cfg=2.5)
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    (save,) = [n for n in wf.nodes.values() if n.type.startswith("SaveImage")]
    out = outcome.results[save.inputs["images"].node_id][0].numpy()
    assert out.shape[0] == 1 and np.isfinite(out).all()
    pictures = len(of("LoadImage"))
    for node in of("TextEncodeQwenImageEditPlus"):  # each carries its pictures' reference latents
        (cond,) = outcome.results[node.id]
        assert len(cond[0][1][flux_references.LATENTS]) == pictures
    for node in of("FluxKontextMultiReferenceLatentMethod"):  # 2511: the references modulated at time 0
        (cond,) = outcome.results[node.id]
        assert cond[0][1][flux_references.METHOD] == "index_timestep_zero"


def test_comfyui_multi_angle_app_runs_on_an_int8_transformer_with_its_lora(registry, env, root, monkeypatch):
    """ComfyUI's template_qwen_multiangle app: CameraAngle's shot words as the prompt of
    TextEncodeQwenImageEditPlus, the multiple-angles LoRA on the int8_convrot Edit 2511 transformer
    (here the tiny one quantised by comfy-kitchen, tests/test_int8_quant.py), Lightning switched off.
    It runs; the words reach the encoder; the LoRA moves the picture."""
    import importlib

    import tiny_qwen_image
    from flow_family_lora import lora_file, module_shapes, random_factors
    from nodes import kontext
    from safetensors.torch import save_file
    from test_int8_quant import quantise_int8

    from engine.formats import parse_document

    tiny_qwen_image_edit.shrink_picture_area(monkeypatch)
    monkeypatch.setattr(kontext, "KONTEXT_SIZES", ((64, 64), (96, 64), (64, 96)))
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    document = json.loads((folder / "template_qwen_multiangle.app.json").read_text(encoding="utf-8"))
    transformer = tiny_qwen_image.components()["transformer"]
    int8, _ = quantise_int8(transformer.state_dict())
    save_file({k: v.contiguous() for k, v in int8.items()}, str(root / "diffusion_models" / "edit-int8.safetensors"))
    (root / "loras").mkdir(exist_ok=True)
    blocks = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.img_mlp.net.2")
    save_file(lora_file(random_factors(module_shapes(transformer, blocks), seed=9), "comfy"),
              str(root / "loras" / "angles.safetensors"))
    save_file({}, str(root / "loras" / "lightning-off.safetensors"))  # switched off: must exist, never loads
    tiny_qwen_image_edit.picture(2, 96, 80).save(env.paths.input.root / "subject.png")

    def run(angle_lora: float):
        wf = parse_document(document, registry)
        of = lambda t: [n for n in wf.nodes.values() if n.type == t]  # noqa: E731
        (unet,), (clip,), (vae,), (load,) = (of(t) for t in ("UNETLoader", "CLIPLoader", "VAELoader", "LoadImage"))
        unet.inputs["unet_name"], clip.inputs["clip_name"], vae.inputs["vae_name"] = \
            "edit-int8.safetensors", FILES["clip"], FILES["vae"]
        load.inputs["image"] = "subject.png"
        (switch,) = of("PrimitiveBoolean")
        switch.inputs["value"] = False
        for node in of("LoraLoaderModelOnly"):
            angles = "multiple-angles" in node.inputs["lora_name"]
            node.inputs["lora_name"] = "angles.safetensors" if angles else "lightning-off.safetensors"
            if angles:
                node.inputs["strength_model"] = angle_lora
        (sampler,) = of("KSampler")
        sampler.inputs.update(seed=4, steps=2)
        outcome = Executor(registry, env).run(wf)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        (camera,) = of("CameraAngle")
        (save,) = [n for n in wf.nodes.values() if n.type.startswith("SaveImage")]
        return outcome, camera, outcome.results[save.inputs["images"].node_id][0].numpy()

    outcome, camera, with_lora = run(1.0)
    assert outcome.results[camera.id][1] == "front-left quarter view elevated shot medium shot"
    _, _, without = run(0.0)
    assert np.isfinite(with_lora).all() and float(np.abs(with_lora - without).max()) > 1 / 255
