"""ComfyUI's ChronoEdit template (comfyui-workflow-templates-json ``image_chrono_edit_14B.json``), as its
editor saved it (a subgraph), on the tiny files saved under the names it asks for.

It validates with only its model files and picture missing. With its weights kept as stored (the
template asks UNETLoader for fp8, which would make a tiny model's picture another) and euler in place of
uni_pc (Kiln's uni_pc is ComfyUI's, stepping a variance-exploding frame; ChronoEditPipeline's scheduler
is diffusers' flow-matching Euler here), the rest of the graph runs unchanged (ModelSamplingSD3 5,
ScaleROPE scale_t 7, CLIPLoader type wan, CLIPVisionEncode none, WanImageToVideo length 5, 20 steps at
cfg 4 (6 steps here), ImageFromBatch 4) and gives the pipeline's last frame within 1/255. Its distill switch on
(LoraLoaderModelOnly, 4 steps, cfg 1) gives the pipeline's with the LoRA merged by hand; as shipped
(fp8, uni_pc) it runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_wan
from engine.executor import Executor
from engine.formats import parse_document
from flow_family_files import env, registry, save_state, template_file_errors  # noqa: F401 (fixtures)

NAME = "image_chrono_edit_14B.json"
PICTURE = "image_chrono_edit_input_image.png"
LORA = "chronoedit_distill_lora.safetensors"
SIZE = tiny_wan.PICTURE
#: The template's 20 steps cut to 6 (test time); its distilled branch keeps its own 4.
STEPS = 6
#: The LoRA the template's LoraLoaderModelOnly gets here: a rank-2 delta on the first block's self-attention query.
LORA_DOWN = torch.randn(2, 256, generator=torch.Generator().manual_seed(8)) * 0.05
LORA_UP = torch.randn(256, 2, generator=torch.Generator().manual_seed(9)) * 0.05


def _template() -> dict:
    import comfyui_workflow_templates_json as module

    return json.loads((Path(module.__file__).parent / "templates" / NAME).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_wan.make_models_folder(tmp_path_factory.mktemp("wan-templates"))
    save_state(root / "loras" / LORA, {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": LORA_DOWN,
                                       "diffusion_model.blocks.0.self_attn.q.lora_B.weight": LORA_UP})
    return root


def _picture() -> np.ndarray:
    return (np.random.RandomState(4).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)


def _workflow(registry, env, as_shipped: bool = False, distill: bool = False) -> object:
    Image.fromarray(_picture()).save(env.paths.input.root / PICTURE)
    wf = parse_document(_template(), registry)
    overrides = {"97:109.width": SIZE, "97:109.height": SIZE, "97:123.value": distill, "97:113.value": STEPS}
    if not as_shipped:
        overrides.update({"97:101.weight_dtype": "default", "97:110.sampler_name": "euler"})
    return wf.with_overrides(overrides)


def _run(registry, env, wf) -> np.ndarray:
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    return outcome.results["97:103"][0].numpy()


def _reference(wf, steps: int, cfg: float, lora: bool = False) -> np.ndarray:
    pipe = tiny_wan.pipeline()
    if lora:
        import copy

        pipe.transformer = copy.deepcopy(pipe.transformer)
        with torch.no_grad():
            pipe.transformer.blocks[0].attn1.to_q.weight += LORA_UP @ LORA_DOWN
    with torch.no_grad():
        frames = pipe(image=Image.fromarray(_picture()), prompt=wf.nodes["97:105"].inputs["text"],
                      negative_prompt=wf.nodes["97:106"].inputs["text"], height=SIZE, width=SIZE, num_frames=5,
                      num_inference_steps=steps, guidance_scale=cfg, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(wf.nodes["97:110"].inputs["seed"])).frames
    return frames[0, -1:]


def test_template_validates_with_only_its_files_missing(registry, tmp_path):
    wf, files = template_file_errors(registry, _template(), tmp_path)  # no unknown node type
    allowed = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("CLIPVisionLoader", "clip_name"),
               ("VAELoader", "vae_name"), ("LoraLoaderModelOnly", "lora_name"), ("LoadImage", "image")}
    assert files and files <= allowed, files
    assert {n.type for n in wf.nodes.values()} >= {"WanImageToVideo", "ScaleROPE", "CLIPVisionEncode"}


def test_template_runs_on_tiny_files_and_equals_chronoedit_pipeline(registry, env):
    wf = _workflow(registry, env)
    ours = _run(registry, env, wf)
    theirs = _reference(wf, STEPS, 4.0)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    gap = np.abs(ours - theirs).max()
    print(f"{NAME}: {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    distilled = _run(registry, env, _workflow(registry, env, distill=True))
    assert np.abs(distilled - _reference(wf, 4, 1.0, lora=True)).max() <= 1 / 255
    assert np.abs(distilled - ours).max() > 0.02  # the switch matters: not vacuous


def test_template_as_shipped_runs(registry, env):
    """fp8 weights and ComfyUI's uni_pc, as the template ships (its picture is the tiny model's in fp8)."""
    ours = _run(registry, env, _workflow(registry, env, as_shipped=True))
    assert ours.shape == (1, SIZE, SIZE, 3) and np.isfinite(ours).all()
