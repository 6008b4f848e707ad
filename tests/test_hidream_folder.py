"""HiDream-I1 diffusers folders (HiDreamImagePipeline.save_pretrained) through CheckpointLoaderSimple and
DiffusersLoader (nodes.checkpoint.hidream_load.load_folder), against the pipeline on the same tiny weights.

The folder holds transformer/, the FLUX VAE, CLIP-L and CLIP-G (with projections), T5, Llama 3.1 as a causal
LM, their four tokenizers and the scheduler. A hub folder without Llama 3.1 (the pipeline takes it apart)
loads its MODEL and VAE; its CLIP names the missing encoder and QuadrupleCLIPLoader when asked to encode.
The folder's transformer builds straight into disk blocks when paged, and the released transformer's size
asked before such a build (meta tensors only) is its bf16 bytes.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tiny_hidream
from flow_family_files import checkpoint_loader, env, models_root, registry, run, txt2img_graph  # noqa: F401
from flow_family_files import same_state, unet_weights
from node_call import call
from nodes import loaders
from nodes.families import hidream

FOLDER = "tiny-hidream-diffusers"
NO_LLAMA = "tiny-hidream-no-llama"
PROMPT = "a red barn in a field"


def _make(root):
    """A models folder with the pipeline saved under checkpoints/ and, without text_encoder_4 and tokenizer_4,
    under diffusers/ (what DiffusersLoader lists)."""
    folder = root / "checkpoints" / FOLDER
    tiny_hidream.pipeline().save_pretrained(str(folder), safe_serialization=True)
    shutil.copytree(folder, root / "diffusers" / NO_LLAMA, ignore=shutil.ignore_patterns("text_encoder_4", "tokenizer_4"))
    return root


root = models_root(_make, "hidream-folder")


def test_checkpoint_loader_reads_the_folder_to_the_pipelines_weights_and_conditioning(env):
    model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=FOLDER)
    assert model.family is clip.family is hidream.FAMILY and model.scheduler_config["shift"] == 3.0
    assert same_state(unet_weights(model), tiny_hidream.components()["transformer"].state_dict())
    [[t5, extra]] = clip.encode(PROMPT)
    with torch.no_grad():
        want_t5, _, want_llama, _, want_pooled, _ = tiny_hidream.pipeline().encode_prompt(
            PROMPT, do_classifier_free_guidance=False, device=torch.device("cpu"))
    assert torch.allclose(t5, want_t5.float(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(extra[hidream.LLAMA], want_llama.movedim(0, 1).float(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(extra["pooled_output"], want_pooled.float(), atol=1e-5, rtol=1e-5)
    with clip.encoder("text_encoder_4") as llama:
        assert type(llama).__name__ == "LlamaModel"  # lm_head left unread


def test_a_graph_from_the_folder_equals_hidream_pipeline(registry, env):
    """CheckpointLoaderSimple on the folder, euler / simple at the folder's shift 3 with cfg and a negative:
    the pipeline's picture within 1/255 (its sigmas set to the same grid, as tests/test_hidream.py does)."""
    from engine.workflow import parse
    from test_hidream import SIZE, reference

    graph = txt2img_graph(checkpoint_loader(FOLDER), prompt=PROMPT, negative="blurry", size=SIZE, seed=3, steps=3,
                          cfg=5.0, scheduler="simple")
    ours = run(registry, env, parse(graph)).results["6"][0].numpy()
    theirs = reference(tiny_hidream.pipeline(), PROMPT, "blurry", 3, 3, 5.0)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= 1 / 255
    graph["5"]["inputs"]["seed"] = 4
    assert np.abs(ours - run(registry, env, parse(graph)).results["6"][0].numpy()).max() > 0.02  # not vacuous


def test_a_folder_without_llama_loads_and_its_clip_names_the_missing_encoder(env):
    from nodes.families.base import ConditioningError

    model, clip, vae = call(loaders.diffusers_loader, env, model_path=NO_LLAMA)
    assert model.family is hidream.FAMILY and "tokenizer_4" not in clip.tokenizers
    assert same_state(unet_weights(model), tiny_hidream.components()["transformer"].state_dict())
    with pytest.raises(ConditioningError, match="text_encoder_4.*QuadrupleCLIPLoader"):
        clip.encode(PROMPT)


def test_the_folders_transformer_builds_straight_into_disk_blocks(root):
    """Paged when the manager rests it on disk: asked with the whole build's bytes (the saved transformer's,
    float32 as the folder), the outputs of the whole model paged afterwards bit for bit."""
    import copy

    from test_offload_load import _disk
    from test_offload_load_families import _hidream_forward, _same_outputs

    from nodes.checkpoint.load import load_checkpoint
    from nodes.runtime import offload
    from nodes.runtime.measure import module_bytes

    whole = copy.deepcopy(tiny_hidream.components()["transformer"])
    asked = []
    paged = load_checkpoint(root / "checkpoints" / FOLDER, torch.float32,
                            offload=lambda n, b: asked.append(n) or _disk()).modules["unet"]
    assert asked == [module_bytes(whole)] and offload.offloaded(paged).paged
    _same_outputs(paged, whole, _hidream_forward)


def test_the_released_transformer_asks_its_17b_bf16_bytes_before_a_paged_build():
    """At the release's size (the shapes tests/test_hidream.py reads the config from, built on the meta device,
    nothing allocated): a bf16 file computing in bf16 asks the manager for two bytes a parameter, 17.1B of them,
    before any block is built (the manager here keeps it whole, so nothing is)."""
    from diffusers import HiDreamImageTransformer2DModel

    from nodes.checkpoint import hidream_load
    from nodes.checkpoint.load import _empty
    from nodes.checkpoint.paged_files import file_straight

    shapes = {"x_embedder.proj.weight": (2560, 64), "final_layer.linear.weight": (64, 2560),
              "p_embedder.pooled_embedder.linear_1.weight": (2560, 2048),
              "caption_projection.0.linear.weight": (2560, 4096), "caption_projection.48.linear.weight": (2560, 4096)}
    shapes.update({f"double_stream_blocks.{i}.block.x": () for i in range(16)})
    shapes.update({f"single_stream_blocks.{i}.block.x": () for i in range(32)})
    shapes.update({f"double_stream_blocks.0.block.ff_i.experts.{i}.w1.weight": () for i in range(4)})
    released = _empty(HiDreamImageTransformer2DModel, hidream_load.transformer_config(shapes))
    params = sum(p.numel() for p in released.parameters())
    assert 17.0e9 < params < 17.2e9
    state = {k: torch.empty(p.shape, dtype=torch.bfloat16, device="meta") for k, p in released.state_dict().items()}
    asked = []
    built = file_straight({"model.diffusion_model." + k: v for k, v in state.items()}, "hidream_i1_full.safetensors",
                          torch.bfloat16, "", lambda size, besides: asked.append(size),
                          hidream_load.file_layout(state, "hidream_i1_full.safetensors"))
    assert built is None and asked == [2 * params]


@pytest.mark.parametrize("config,shift", [({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 6.0}, 6.0),
                                          ({"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0,
                                            "use_flow_sigmas": True, "prediction_type": "flow_prediction"}, 3.0),
                                          ({"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0}, None)])
def test_the_folders_scheduler_gives_the_shift(tmp_path, config, shift):
    """Dev's FlowMatchEuler shift, Full's flow-sigmas UniPC flow_shift; a UniPC without flow sigmas states none."""
    from nodes.checkpoint.hidream_load import folder_shift

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert folder_shift(tmp_path) == shift
