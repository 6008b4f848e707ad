"""Qwen-Image's Qwen2.5-VL: its vision tower is built on the first picture read, never by text alone.

The tiny Qwen-Image's text encoder (tests/tiny_qwen_image.py) is loaded from ComfyUI's file and from a
diffusers folder (transformers 5's ``model.visual.`` names). Text-only uses (CLIPTextEncode, the Edit
encoders without pictures, TextGenerate without pictures, a LoRA of the language model) leave the
tower's slot empty: no tower parameter exists and the model manager counts the language model's bytes
alone. The first picture read builds it from the file, bit for bit, and encodes as
QwenImageEditPipeline's ``encode_prompt`` does; what must see the whole model (a LoRA naming tower
modules, CLIPMergeSimple, CLIPSave) builds it first, as for Krea 2's Qwen3-VL (tests/test_qwen3vl_vision.py).
"""
from __future__ import annotations

import pytest
import torch

import tiny_qwen_image
import tiny_qwen_image_edit
from flow_family_files import registry  # noqa: F401 (fixture)
from node_call import Called, call
from nodes import split_loaders
from nodes.checkpoint.qwen_vision import TOWER
from nodes.runtime import deferred
from nodes.runtime.measure import module_bytes
from test_qwen3vl_vision import lora_context, tower_and_text_loras
from test_qwen_image_edit import FILES, env, image_of, root  # noqa: F401 (fixtures: ComfyUI's split files)

PROMPT = "turn the sky purple"


def _clip(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=FILES["clip"], type="qwen_image")
    return clip


def _source():
    """The tiny Qwen2.5-VL the files were written from (transformers' Qwen2_5_VLModel)."""
    return tiny_qwen_image.components()["text_encoder"].model


def _held(env) -> int:
    """The bytes the model manager counts for the CLIP's text encoder."""
    (entry,) = [e for e in env.models.stats()["entries"] if "text_encoder" in e["modules"]]
    return entry["modules"]["text_encoder"]["bytes"]


def _unbuilt(model) -> bool:
    """The tower waits: its slot is empty and not one of the model's parameters is the tower's."""
    return (model.visual is None and deferred.pending(model) == (TOWER,)
            and {n.split(".")[0] for n, _ in model.named_parameters()} == {"language_model"})


def _edit_reference(picture) -> torch.Tensor:
    """QwenImageEditPipeline's prompt states for ``picture`` (the tiny pipeline, its own resize rule)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit

    from nodes.families import qwen_image_edit

    width, height, _ = edit.calculate_dimensions(qwen_image_edit.AREA, picture.width / picture.height)
    pipe = tiny_qwen_image_edit.pipeline(plus=False)
    with torch.no_grad():
        states, _ = pipe.encode_prompt(prompt=PROMPT, image=pipe.image_processor.resize(picture, height, width))
    return states


def test_text_alone_never_builds_the_tower(registry, env):
    """CLIPTextEncode, TextEncodeQwenImageEdit(Plus) without pictures and TextGenerate without pictures run
    the language model alone; the conditioning is QwenImagePipeline's encode_prompt."""
    text_bytes, tower_bytes = module_bytes(_source().language_model), module_bytes(_source().visual)
    clip = _clip(env)
    model = clip.peek("text_encoder")
    assert type(model).__name__ == "Qwen2_5_VLModel" and _unbuilt(model)  # as loaded
    (cond,) = call(registry.get("CLIPTextEncode"), env, clip=clip, text=PROMPT)
    call(registry.get("TextEncodeQwenImageEdit"), env, clip=clip, prompt=PROMPT)
    call(registry.get("TextEncodeQwenImageEditPlus"), env, clip=clip, prompt=PROMPT)
    assert _unbuilt(model) and env.models.counters["parts"] == 0
    assert tower_bytes > 0 and module_bytes(model) == text_bytes and _held(env) == text_bytes
    with torch.no_grad():
        theirs, _ = tiny_qwen_image.pipeline().encode_prompt(prompt=PROMPT)
    assert cond[0][0].shape == theirs.shape and float((cond[0][0] - theirs).abs().max()) < 1e-5

    text, _ = call(registry.get("TextGenerate"), env, clip=clip, prompt="A red fox", max_length=2,
                   sampling_mode="off")
    assert isinstance(text, str) and _unbuilt(model) and env.models.counters["parts"] == 0


def test_the_first_picture_read_builds_the_tower_from_the_file(registry, env, monkeypatch):
    """TextEncodeQwenImageEdit with a picture builds the tower once (the file's tensors, bit for bit; the
    manager's count grows by its bytes) and encodes as QwenImageEditPipeline; later picture reads
    (Plus, TextGenerate) reuse it, and text alone still encodes as before."""
    tiny_qwen_image_edit.shrink_picture_area(monkeypatch)
    text_bytes, tower_bytes = module_bytes(_source().language_model), module_bytes(_source().visual)
    clip = _clip(env)
    model = clip.peek("text_encoder")
    (before,) = call(registry.get("CLIPTextEncode"), env, clip=clip, text=PROMPT)
    assert _unbuilt(model)

    picture = tiny_qwen_image_edit.picture(0, 160, 112)
    (cond,) = call(registry.get("TextEncodeQwenImageEdit"), env, clip=clip, prompt=PROMPT, image=image_of(picture))
    theirs = _edit_reference(picture)
    assert cond[0][0].shape == theirs.shape and float((cond[0][0] - theirs).abs().max()) < 1e-5
    assert model.visual is not None and deferred.pending(model) == () and env.models.counters["parts"] == 1
    assert module_bytes(model) == text_bytes + tower_bytes and _held(env) == text_bytes + tower_bytes
    ours, source = model.state_dict(), _source().state_dict()
    assert set(ours) == set(source) and any(k.startswith("visual.blocks.0.") for k in ours)
    assert all(torch.equal(ours[k], source[k]) for k in source)

    other = tiny_qwen_image_edit.picture(1, 96, 128)
    (plus,) = call(registry.get("TextEncodeQwenImageEditPlus"), env, clip=clip, prompt=PROMPT,
                   image1=image_of(other))
    text, _ = call(registry.get("TextGenerate"), env, clip=clip, prompt="A red fox", max_length=2,
                   sampling_mode="off", image=image_of(other))
    assert isinstance(text, str) and plus[0][0].shape[1] > cond[0][0].shape[1] // 4
    assert env.models.counters["parts"] == 1  # built once
    (after,) = call(registry.get("CLIPTextEncode"), env, clip=clip, text=PROMPT)
    assert torch.equal(after[0][0], before[0][0])


def test_a_diffusers_folders_tower_waits_too(env, tmp_path):
    """A QwenImagePipeline folder's text encoder (transformers 5's names: ``model.visual.``) is built with
    the tower waiting, which builds bit for bit from the folder's files."""
    from nodes.checkpoint.qwen_image_load import vae_and_text_encoder, build_text_model

    tiny_qwen_image.components()["text_encoder"].save_pretrained(str(tmp_path / "text_encoder"))
    tiny_qwen_image.components()["vae"].save_pretrained(str(tmp_path / "vae"))
    model = vae_and_text_encoder(tmp_path, torch.float32, build_text_model)["text_encoder"]
    assert _unbuilt(model)
    assert deferred.build(model, TOWER) is model.visual and deferred.pending(model) == ()
    ours, source = model.state_dict(), _source().state_dict()
    assert set(ours) == set(source) and all(torch.equal(ours[k], source[k]) for k in source)


def test_a_lora_on_the_tower_builds_it_and_patches_it(env, root):
    """A LoRA naming tower modules (kohya's lora_te_visual_*) patches the tower it builds (W + s * up @ down);
    one of the language model alone leaves it unbuilt."""
    from nodes.lora import apply_lora

    messages: list[str] = []
    ctx = lora_context(env, messages)
    weight, up, down = tower_and_text_loras(root, _source(), "vl-tower", "vl-text")
    clip = _clip(env)
    apply_lora(ctx, "vl-text.safetensors", None, clip, 0.0, 1.0)
    assert _unbuilt(clip.peek("text_encoder")) and "1 modules patched" in messages[-1]

    _, patched = apply_lora(ctx, "vl-tower.safetensors", None, clip, 0.0, 0.5)
    assert clip.peek("text_encoder").visual is not None and "1 modules patched" in messages[-1]
    with patched.encoder("text_encoder") as te:
        got = te.visual.blocks[0].attn.qkv.weight.detach().clone()
    assert torch.allclose(got, weight + 0.5 * (up @ down), atol=1e-5, rtol=0)
    with clip.encoder("text_encoder") as te:  # the handle without the LoRA: the file's weight
        assert torch.equal(te.visual.blocks[0].attn.qkv.weight, weight)


def test_a_clip_merge_merges_the_towers(env):
    """CLIPMergeSimple of two Qwen-Image CLIPs that only ever encoded text merges their towers too."""
    from nodes.model_merging import merge_clips

    first, second = _clip(env), _clip(env)
    assert _unbuilt(first.peek("text_encoder"))
    (merged,) = merge_clips(lora_context(env, []), first, second, "CLIPMergeSimple 0.5", 0.5, 0.5)
    assert first.peek("text_encoder").visual is not None and second.peek("text_encoder").visual is not None
    assert any(name.startswith("visual.") for name in merged.loras[-1].tables["text_encoder"])


def test_clipsave_writes_the_tower_it_has_not_built_yet(env):
    """CLIPSave writes the whole Qwen2.5-VL, tower included, bit for bit, from a CLIP that built none."""
    from safetensors.torch import load_file

    from nodes import model_saving

    clip = _clip(env)
    assert _unbuilt(clip.peek("text_encoder"))
    record = Called()
    call(model_saving.clip_save, env, record, clip=clip, filename_prefix="clip/qwen")
    (saved,) = record.ui["clip"]
    got = load_file(str(env.paths.output.root / saved["subfolder"] / saved["filename"]))
    source = _source().state_dict()
    assert set(got) == set(source) and any(k.startswith("visual.") for k in got)
    assert all(torch.equal(got[k], source[k]) for k in source)


def test_lora_save_reads_the_tower_a_reload_left_waiting(env, root):
    """LoraSave of CLIPMergeSubtract(a CLIP with a tower LoRA, a second copy of its file) after the model
    manager dropped both encoders, so their towers wait again: the file holds the towers' difference (the
    LoRA's up @ down), where the LoRA and the merge once failed to find the towers' weights. A difference
    that does not patch the waiting tower leaves it out and says so."""
    import shutil

    from safetensors.torch import load_file

    from nodes import lora_extract, model_merging
    from nodes.lora import apply_lora

    _, up, down = tower_and_text_loras(root, _source(), "vl-tower", "vl-text")
    (path,) = root.rglob(FILES["clip"])
    copy = path.with_name("tiny-qwen_2.5_vl-copy.safetensors")
    shutil.copyfile(path, copy)
    clip = _clip(env)
    (base,) = call(split_loaders.clip_loader, env, clip_name=copy.name, type="qwen_image")
    _, tower_lora = apply_lora(lora_context(env, []), "vl-tower.safetensors", None, clip, 0.0, 1.0)
    _, text_lora = apply_lora(lora_context(env, []), "vl-text.safetensors", None, clip, 0.0, 1.0)
    (diff,) = call(model_merging.clip_merge_subtract, env, clip1=tower_lora, clip2=base, multiplier=1.0)
    assert base.peek("text_encoder") is not clip.peek("text_encoder")  # two modules: the merge reads the second

    def saved(difference, name: str):
        env.models.unload_all()
        assert _unbuilt(difference.peek("text_encoder")) and _unbuilt(base.peek("text_encoder"))  # waiting again
        record = Called()
        call(lora_extract.lora_save, env, record, filename_prefix=f"loras/{name}", rank=2, lora_type="full_diff",
             bias_diff=False, text_encoder_diff=difference)
        (entry,) = record.ui["loras"]
        return load_file(str(env.paths.output.root / entry["subfolder"] / entry["filename"])), record.messages

    got, messages = saved(diff, "tower")
    (qkv,) = [k for k in got if k.endswith("visual.blocks.0.attn.qkv.diff")]
    assert torch.allclose(got[qkv].float(), up @ down, atol=1e-2, rtol=1e-2) and float(got[qkv].abs().max()) > 0.1
    assert not any("left out" in m for m in messages)
    got, messages = saved(text_lora, "text")
    assert not any("visual." in k for k in got) and any(k.endswith("mlp.up_proj.diff") for k in got)
    assert any("visual" in m and "left out" in m for m in messages)
    # under ComfyUI's name for Qwen-Image's encoder, and LoraLoader reads it back onto that encoder
    assert all(k.startswith("text_encoders.qwen25_7b.transformer.") for k in got)
    (entry,) = [p for p in env.paths.output.root.rglob("text*.safetensors")]
    shutil.copyfile(entry, root / "loras" / "text-roundtrip.safetensors")
    read_back: list[str] = []
    _, again = apply_lora(lora_context(env, read_back), "text-roundtrip.safetensors", None, base, 0.0, 1.0)
    assert f"{len(got)} modules patched ({len(got)} in text_encoder)" in read_back[0], read_back
