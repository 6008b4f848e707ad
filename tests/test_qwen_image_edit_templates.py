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
