"""Qwen-Image-Edit graphs from files: Kiln's workflows/qwen-image-edit.json and a diffusers
QwenImageEditPlusPipeline folder against the pipeline, and the error for a text encoder without its
vision tower (tiny split files as tests/test_qwen_image_edit.py writes them; ComfyUI's templates are
tests/test_qwen_image_edit_templates.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_qwen_image
import tiny_qwen_image_edit
from engine.executor import Executor
from engine.registry import default_registry
from node_call import call, environment_over
from test_qwen_image_edit import FILES, save_split_files

PROMPT = "make it look like winter"
SIZE = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_split_files(tmp_path_factory.mktemp("qwen-edit-wf-models"))


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


@pytest.fixture()
def small_pictures(monkeypatch):
    tiny_qwen_image_edit.shrink_picture_area(monkeypatch)


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def test_edit_workflow_equals_qwen_image_edit_plus_pipeline(registry, env, small_pictures):
    from engine.workflow import load

    picture = tiny_qwen_image_edit.picture(3, 144, 96)
    picture.save(env.paths.input.root / "edit.png")
    wf = load(Path(__file__).resolve().parent.parent / "workflows" / "qwen-image-edit.json").with_overrides(
        dict(diffusion_model=FILES["unet"], text_encoder=FILES["clip"], vae=FILES["vae"], prompt=PROMPT,
             negative_prompt="", image="edit.png", width=SIZE, height=SIZE, steps=2, seed=9, cfg=4.0))
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    ours = outcome.results["9"][0].numpy()
    with torch.no_grad():
        theirs = tiny_qwen_image_edit.pipeline(plus=True)(
            image=[picture], prompt=PROMPT, negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=2,
            true_cfg_scale=4.0, output_type="np", generator=torch.Generator().manual_seed(9)).images
    gap = float(np.abs(ours - theirs).max())
    print(f"workflow gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255


def test_text_encoder_without_vision_tower_is_named(env, root):
    from safetensors.torch import save_file

    from engine.context import NodeError
    from nodes import split_loaders
    from nodes.qwen_edit_nodes import text_encode_qwen_image_edit, text_encode_qwen_image_edit_plus

    state = {k: v for k, v in tiny_qwen_image.comfy_text_state().items() if not k.startswith("visual.")}
    save_file(state, str(root / "text_encoders" / "text-only.safetensors"))
    (clip,) = call(split_loaders.clip_loader, env, clip_name="text-only.safetensors", type="qwen_image")
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(NodeError) as err:
        call(text_encode_qwen_image_edit, env, clip=clip, prompt=PROMPT, image=image)
    assert err.value.input_name == "clip" and "vision tower" in str(err.value)
    # no picture: Edit encodes the text-to-image template, Plus the Edit template (as their pipelines)
    (cond,) = call(text_encode_qwen_image_edit, env, clip=clip, prompt=PROMPT)
    assert torch.equal(cond[0][0], clip.encode(PROMPT)[0][0])
    (plus,) = call(text_encode_qwen_image_edit_plus, env, clip=clip, prompt=PROMPT)
    with torch.no_grad():
        states, _ = tiny_qwen_image_edit.pipeline(plus=True).encode_prompt(prompt=PROMPT, image=None)
    assert states.shape == plus[0][0].shape and float((states - plus[0][0]).abs().max()) < 1e-5


def test_diffusers_edit_plus_folder_equals_the_pipeline(env, root, small_pictures):
    """A QwenImageEditPlusPipeline folder through CheckpointLoaderSimple (its text encoder saved by
    transformers 5: ``model.language_model.`` and ``model.visual.``) with the Plus encoder."""
    from nodes import loaders
    from test_qwen_image_edit import diffusers, image_of, kiln, pictures

    tiny_qwen_image_edit.save_folder(root / "checkpoints" / "tiny-qwen-image-edit-diffusers")
    loaded = call(loaders.checkpoint_loader, env, ckpt_name="tiny-qwen-image-edit-diffusers")[:3]
    pics = pictures()
    ours = kiln(env, loaded, [image_of(p) for p in pics], True)
    gap = float(np.abs(ours - diffusers(pics, True)).max())
    print(f"diffusers folder gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255


def test_a_controlnet_beside_references_adds_to_the_image_tokens_only():
    """A Qwen-Image ControlNet's samples cover the image's tokens; with reference tokens appended
    they are padded with zeros (ComfyUI adds them to the first tokens), so zeros change nothing."""
    from nodes.families import flux_references, qwen_image

    net = qwen_image.FAMILY.wrap_network(tiny_qwen_image.components()["transformer"])
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, tiny_qwen_image.TEXT, generator=g)
    refs = flux_references.References((torch.randn(1, 16, 12, 8, generator=g),), "index")
    inner = tiny_qwen_image.HEADS * tiny_qwen_image.HEAD_DIM
    t = torch.tensor(500.0)
    with torch.no_grad():
        plain = net(x, t, text, reference_latents=refs)[0]
        zeros = net(x, t, text, reference_latents=refs,
                    controlnet_block_samples=[torch.zeros(1, 16, inner)] * tiny_qwen_image.LAYERS)[0]
        some = net(x, t, text, reference_latents=refs,
                   controlnet_block_samples=[torch.randn(1, 16, inner, generator=g)] * tiny_qwen_image.LAYERS)[0]
    assert torch.equal(plain, zeros) and (some - plain).abs().max() > 1e-3
