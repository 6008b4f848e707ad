"""HunyuanImage 2.1 (and its refiner) and HunyuanVideo 1.5 from diffusers folders (``HunyuanImagePipeline``,
``HunyuanImageRefinerPipeline``, ``HunyuanVideo15Pipeline`` and ``HunyuanVideo15ImageToVideoPipeline
.save_pretrained``) through CheckpointLoaderSimple and DiffusersLoader: the same weights bit for bit as the pipelines'
modules and the split files, in the family's dtype, and the same images as the split-file graphs (which tests/test_hunyuan_image.py and tests/test_hunyuan_video15.py prove equal to the
pipelines within 1/255)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_hunyuan_image
import tiny_hunyuan_image_refiner
import tiny_hunyuan_video15
from flow_family_files import env, models_root, registry, run  # noqa: F401 (env, registry: fixtures)
from node_call import call
from nodes import loaders
from nodes.families import hunyuan_image, hunyuan_image_refiner, hunyuan_video15

IMAGE, REFINER, VIDEO = "tiny-hunyuanimage21-diffusers", "tiny-hunyuanimage21-refiner-diffusers", \
    "tiny-hunyuanvideo15-diffusers"
#: HunyuanVideo15ImageToVideoPipeline's folder: the same modules and an image_encoder/ (SigLIP) Kiln leaves unread.
VIDEO_I2V = "tiny-hunyuanvideo15-i2v-diffusers"
#: The tiny video pipeline's saved shift: not the family's 7, so a folder's own scheduler config is seen to count.
VIDEO_SHIFT = 5.0


def _make(root):
    tiny_hunyuan_video15.make_models_folder(root)  # HunyuanImage 2.1's split files too
    tiny_hunyuan_image_refiner.make_models_folder(root)
    pipes = {IMAGE: tiny_hunyuan_image.pipeline(3.5), REFINER: tiny_hunyuan_image_refiner.pipeline(),
             VIDEO: _video_pipeline(), VIDEO_I2V: _video_pipeline(edit=True)}
    for name, pipe in pipes.items():
        pipe.save_pretrained(str(root / "checkpoints" / name), safe_serialization=True)
    # DiffusersLoader and CheckpointLoaderSimple share the folder rule (pipeline_folders): one folder checks the path
    pipes[IMAGE].save_pretrained(str(root / "diffusers" / IMAGE), safe_serialization=True)
    return root


def _video_pipeline(edit: bool = False):
    """HunyuanVideo15Pipeline as the hub's folders hold it: its text_encoder the bare Qwen2_5_VLTextModel (the
    pipeline's declared class; ``layers.*`` with no prefix, no vision tower), the tiny model's language model;
    ``edit``: HunyuanVideo15ImageToVideoPipeline with the tiny SigLIP."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance

    from flow_family_files import quiet_pipeline

    parts = {k: v for k, v in tiny_hunyuan_video15.components().items() if k != "image_encoder"}
    extra = {}
    if edit:
        from transformers import SiglipImageProcessor

        size = tiny_hunyuan_video15.SIZE
        extra = {"image_encoder": tiny_hunyuan_video15.components()["image_encoder"],
                 "feature_extractor": SiglipImageProcessor(size={"height": size, "width": size})}
    return quiet_pipeline("HunyuanVideo15ImageToVideoPipeline" if edit else "HunyuanVideo15Pipeline", parts,
                          guider=ClassifierFreeGuidance(guidance_scale=6.0),
                          scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=VIDEO_SHIFT),
                          **extra)


root = models_root(_make, "hunyuan-folder-models")

CASES = {IMAGE: (tiny_hunyuan_image, hunyuan_image), REFINER: (tiny_hunyuan_image_refiner, hunyuan_image_refiner),
         VIDEO: (tiny_hunyuan_video15, hunyuan_video15), VIDEO_I2V: (tiny_hunyuan_video15, hunyuan_video15)}


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


def _load(env, how: str, name: str):
    if how == "checkpoint":
        return call(loaders.checkpoint_loader, env, ckpt_name=name)
    return call(loaders.diffusers_loader, env, model_path=name)


@pytest.mark.parametrize("how, name", [("checkpoint", IMAGE), ("checkpoint", REFINER), ("checkpoint", VIDEO),
                                       ("checkpoint", VIDEO_I2V), ("diffusers", IMAGE)])
def test_the_folder_loads_every_weight_bit_for_bit(env, how, name):
    tiny, family = CASES[name]
    model, clip, vae = _load(env, how, name)
    assert model.family is family.FAMILY and clip.family is family.FAMILY
    parts = tiny.components()
    with model.unet() as net:
        _equal(_weights(net), _weights(parts["transformer"]))
    with clip.encoder("text_encoder") as qwen:  # Qwen2.5-VL: its language model (a tower waits for a picture)
        got = _weights(qwen)
    if any(k.startswith("language_model.") for k in got):  # HunyuanImage's Qwen2_5_VLForConditionalGeneration
        got = {k.removeprefix("language_model."): v for k, v in got.items() if k.startswith("language_model.")}
    else:  # HunyuanVideo 1.5's folders: Qwen2_5_VLTextModel alone
        assert name in (VIDEO, VIDEO_I2V)
    qwen = parts["text_encoder"]  # HunyuanImage's whole Qwen2.5-VL; HunyuanVideo 1.5's text model alone
    _equal(got, _weights(qwen.model.language_model if hasattr(qwen, "lm_head") else qwen))
    if "text_encoder_2" in parts:
        with clip.encoder("text_encoder_2") as byt5:
            _equal(_weights(byt5), _weights(parts["text_encoder_2"]))
        assert type(clip.tokenizers["tokenizer_2"]).__name__ == "ByT5Tokenizer"
    else:
        assert "tokenizer_2" not in clip.tokenizers
    with vae.module() as module:  # the video VAEs behind Kiln's one-frame wrapper (.vae)
        got = {k.removeprefix("vae."): v for k, v in _weights(module).items()}
    _equal(got, _weights(parts["vae"]))


@pytest.mark.parametrize("name, split_vae", [(IMAGE, "tiny-hunyuan_image_2.1_vae.safetensors"),
                                             (VIDEO, "tiny-hunyuanvideo15_vae.safetensors")])
def test_the_folders_vae_is_the_split_files(env, name, split_vae):
    """The folder's VAE (diffusers' names) and ComfyUI's file (Tencent's) through one builder: one module."""
    _, _, vae = _load(env, "checkpoint", name)
    (split,) = call(loaders.vae_loader, env, vae_name=split_vae)
    with vae.module() as folder_module, split.module() as split_module:
        assert type(folder_module) is type(split_module)
        _equal(_weights(folder_module), _weights(split_module))


def test_the_folder_shift_is_the_folders_scheduler_config(env):
    """The folder's scheduler config over the family's: the video folder saved shift 5, the family's is 7."""
    model, _, _ = _load(env, "checkpoint", VIDEO)
    assert hunyuan_video15.SHIFT != VIDEO_SHIFT
    assert model.scheduler_config["shift"] == VIDEO_SHIFT


@pytest.mark.parametrize("name", [IMAGE, VIDEO])
def test_the_folder_loads_in_the_familys_dtype(root, name):
    """On a bfloat16 GPU's rule every module computes in the family's first dtype (ComfyUI's lists: bfloat16 for
    HunyuanImage 2.1, float16 for HunyuanVideo 1.5; the refiner's row resolves by HunyuanImage 2.1's list)."""
    from nodes.checkpoint.load import load_checkpoint
    from nodes.runtime import precision

    family = CASES[name][1].FAMILY
    want = precision.resolve(precision.DtypeRule("auto", gpu=True, gpu_bf16=True), family)
    loaded = load_checkpoint(root / "checkpoints" / name, precision.DtypeRule("auto", gpu=True, gpu_bf16=True))
    assert loaded.family is family and want == (torch.float16 if name == VIDEO else torch.bfloat16)
    for part, module in loaded.modules.items():
        found = {p.dtype for p in module.parameters() if p.is_floating_point()}
        assert found == {want}, (part, found)


def _image_graph() -> dict:
    from test_hunyuan_image import NEGATIVE, PROMPT, _graph

    split = _graph(PROMPT, NEGATIVE, 3, 3, 3.5)
    folder = {k: v for k, v in _graph(PROMPT, NEGATIVE, 3, 3, 3.5).items() if k not in ("1", "8", "9")}
    folder["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": IMAGE}}
    folder["2"]["inputs"]["clip"] = folder["3"]["inputs"]["clip"] = ["1", 1]
    folder["6"]["inputs"]["vae"] = ["1", 2]
    return split, folder, "6"


def _video_graph() -> dict:
    from test_hunyuan_video15 import NEGATIVE, PROMPT, _graph

    split = _graph(PROMPT, NEGATIVE, 3, 3, 6.0, 7.0)
    folder = {k: v for k, v in _graph(PROMPT, NEGATIVE, 3, 3, 6.0, 7.0).items() if k not in ("10", "11", "12")}
    folder["12"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": VIDEO}}
    folder["44"]["inputs"]["clip"] = folder["93"]["inputs"]["clip"] = ["12", 1]
    folder["8"]["inputs"]["vae"] = ["12", 2]
    return split, folder, "8"


def _refiner_graph() -> dict:
    """The refiner's graph (tests/test_hunyuan_image_refiner.py): the split graph's CLIP is DualCLIPLoader type
    hunyuan_image's (the base family's, encoding the refiner template too), the folder's the refiner family's."""
    from test_hunyuan_image_refiner import PROMPT, _graph

    split = _graph(PROMPT, 3, 3, 3.25)
    folder = {k: v for k, v in _graph(PROMPT, 3, 3, 3.25).items() if k not in ("1", "2", "3")}
    folder["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": REFINER}}
    folder["6"]["inputs"]["clip"] = folder["8"]["inputs"]["clip"] = ["1", 1]
    folder["5"]["inputs"]["vae"] = folder["11"]["inputs"]["vae"] = ["1", 2]
    return split, folder, "11"


@pytest.mark.parametrize("graphs", [_image_graph, _video_graph, _refiner_graph],
                         ids=["hunyuan_image", "hunyuan_video15", "hunyuan_image_refiner"])
def test_checkpoint_loader_graph_equals_the_split_file_graph(registry, env, graphs):
    from test_hunyuan_image_refiner import picture

    picture().save(env.paths.input.root / "picture.png")  # the refiner's input
    split, folder, out = graphs()
    ours = run(registry, env, _parse(folder)).results[out][0].numpy()
    theirs = run(registry, env, _parse(split)).results[out][0].numpy()
    gap = float(np.abs(ours - theirs).max())
    print(f"CheckpointLoaderSimple folder graph against the split-file graph: {gap * 255:.4f}/255")
    assert ours.shape == theirs.shape and ours.shape[0] == 1 and gap <= 1e-6


def _parse(graph: dict):
    from engine.workflow import parse

    return parse(json.loads(json.dumps(graph)))
