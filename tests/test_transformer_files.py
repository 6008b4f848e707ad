"""nodes.checkpoint.flow_transformers.TransformerFiles: each family's one declaration of its transformer file.

The loaders' module-level names are the declaration's own methods (so the whole build, UNETLoader's path and
the build straight into disk blocks cannot drift apart), every declaration names a class diffusers has, a
family Kiln registers and a key module with the conversions its builds call; and a refusal declared once
holds in both builds (Kandinsky 5's video model: the block build refuses it in the whole build's words,
before any block is written).
"""
from __future__ import annotations

import importlib

import pytest
import torch

import tiny_kandinsky5
from nodes.checkpoint.load import CheckpointError
from nodes.runtime import offload

DECLARED = ("chroma", "fibo2", "flux2", "hidream", "ideogram4", "joyimage", "kandinsky5", "krea2", "longcat", "ovis",
            "qwen_image21", "wan", "z_image")


@pytest.mark.parametrize("name", DECLARED)
def test_each_declaration_is_complete_and_is_the_loaders_names(name):
    import diffusers

    loader = importlib.import_module(f"nodes.checkpoint.{name}_load")
    files = loader.FILES
    assert loader.build_transformer == files.build and loader.load_transformer_file == files.load
    assert loader.file_layout == files.layout
    assert isinstance(getattr(diffusers, files.model_class), type)
    assert importlib.import_module(f"nodes.families.{files.family}").FAMILY is not None
    wanted = ("strip", "transformer_config", "KeyMismatch")
    wanted += () if files.own_names else ("original_to_diffusers", "diffusers_to_original")
    wanted += () if files.is_diffusers else ("is_diffusers",)
    assert [w for w in wanted if not hasattr(files.keys, w)] == []


def test_a_kandinsky5_video_model_is_refused_by_name_before_any_block_is_written(tmp_path):
    from nodes.checkpoint.kandinsky5_load import load_transformer_file

    state = tiny_kandinsky5.transformer_state()
    state["visual_embeddings.in_layer.weight"] = torch.zeros(tiny_kandinsky5.MODEL, 4 * 33)
    plan = offload.Plan(onload="cpu", rest="disk", note="test", folder_root=str(tmp_path))
    messages = []
    for paged in (lambda n, b: plan, None):
        with pytest.raises(CheckpointError, match=r"video\.safetensors: .*video or image-editing model") as info:
            load_transformer_file(state, "video.safetensors", torch.float32, offload=paged)
        messages.append(str(info.value))
    assert messages[0] == messages[1]  # the block build refuses it in the whole build's words
    assert list(tmp_path.iterdir()) == []  # no block folder was made
