"""Qwen3-VL's vision tower: loaded from ComfyUI's qwen3vl_4b file and from a diffusers folder, and pictures
read through it on a Krea 2 CLIP (TextEncodeQwenImageEditPlus / TextEncodeQwenImageEdit, TextGenerate).

The references are built here from the tiny Krea 2's own ``Qwen3VLModel`` (tests/tiny_krea2.py) and
transformers' image processor at Qwen3-VL's settings, not from Kiln's code: the ids are the template
written out with one ``<|image_pad|>`` per merged patch, the picture sized by diffusers' Qwen-Image-Edit
rule (about 384x384, multiples of 32, Lanczos).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_krea2
from flow_family_files import env, models_root, registry  # noqa: F401 (fixtures)
from node_call import Called, call
from nodes import split_loaders
from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
from nodes.families import krea2
from test_text_generate import ENDOFTEXT, STOPS, krea2_head, readable

CLIP = "tiny-qwen3vl_4b.safetensors"
PROMPT = "in the style of the picture"
EDIT = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
        "image that meets the user's requirements while maintaining consistency with the original input where "
        "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")

root = models_root(tiny_krea2.make_models_folder, "qwen3vl-vision")


def _picture(seed: int, h: int = 40, w: int = 56) -> torch.Tensor:
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _clip(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="krea2")
    return clip


# -- 1. loading ------------------------------------------------------------------------------------


def test_comfyuis_file_loads_the_vision_tower_bit_for_bit(env):
    """The tower is built on the first use that names it (a picture read), from the file, bit for bit."""
    from nodes.families.qwen3_vl import TOWER

    clip = _clip(env)
    model = clip.peek("text_encoder")
    source = tiny_krea2.components()["text_encoder"]
    assert type(model).__name__ == "Qwen3VLModel"
    assert model.visual is None and not any(k.startswith("visual.") for k in model.state_dict())  # not yet
    with clip.encoder("text_encoder", (TOWER,)) as used:
        assert used is model and model.visual is not None
    ours, theirs = model.state_dict(), source.state_dict()
    assert set(ours) == set(theirs) and any(k.startswith("visual.deepstack_merger_list.") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert model.config.vision_config.deepstack_visual_indexes == source.config.vision_config.deepstack_visual_indexes


def test_a_diffusers_folder_loads_the_vision_tower_bit_for_bit(env, root):
    from nodes.checkpoint.load import load_checkpoint

    from nodes.runtime import deferred

    model = load_checkpoint(root / "checkpoints" / "tiny-krea2-turbo-diffusers", torch.float32).modules["text_encoder"]
    assert type(model).__name__ == "Qwen3VLModel"
    assert deferred.pending(model) == ("visual",) and model.visual is None  # built on the first picture read
    tower = deferred.build(model, "visual")
    assert tower is not None and model.visual is tower and deferred.pending(model) == ()
    theirs = tiny_krea2.components()["text_encoder"].state_dict()
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_vision_config_follows_the_releases_for_their_depths():
    from nodes.checkpoint.qwen3_vision import deepstack_layers

    assert deepstack_layers(24, 3) == [5, 11, 17]  # Qwen3-VL 4B (ComfyUI's table)
    assert deepstack_layers(27, 3) == [8, 16, 24]  # 8B / 32B
    assert deepstack_layers(1, 1) == [0]


def test_text_only_encoding_is_unchanged_by_the_tower(env, root):
    """The text path runs the language model alone: a file without ``visual.*`` gives the same states."""
    from safetensors.torch import save_file

    text_only = {k: v for k, v in tiny_krea2.comfy_text_state().items() if not k.startswith("visual.")}
    save_file(text_only, str(root / "text_encoders" / "tiny-qwen3vl-text.safetensors"))
    (bare,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl-text.safetensors", type="krea2")
    assert type(bare.peek("text_encoder")).__name__ == "Qwen3VLTextModel"
    assert torch.equal(bare.encode(PROMPT)[0][0], _clip(env).encode(PROMPT)[0][0])


def _held(env) -> int:
    """The bytes the model manager counts for the Krea 2 CLIP's text encoder entry."""
    (entry,) = [e for e in env.models.stats()["entries"] if "text_encoder" in e["modules"]]
    return entry["bytes"]


def _text_reference(clip, prompt: str) -> torch.Tensor:
    """Krea 2's CONDITIONING of ``prompt`` from the tiny Qwen3-VL's own language model (transformers)."""
    source = tiny_krea2.components()["text_encoder"].language_model
    ids = krea2.prompt_ids(clip.tokenizers["tokenizer"], prompt)
    with torch.no_grad():
        out = source(input_ids=ids, output_hidden_states=True)
    states = torch.stack([out.hidden_states[k] for k in krea2.TEXT_LAYERS], dim=2)
    states = states[:, krea2.template_end(ids[0].tolist()):]
    return states.reshape(1, states.shape[1], -1)


def test_the_tower_is_loaded_on_the_first_picture_read_and_kept(registry, env):
    """A text-only job never builds the tower: the CLIP holds the language model's weights alone and the
    manager counts those; the first picture read builds it from the file (the eager build's conditioning),
    the manager's count grows by its bytes, and later jobs reuse it."""
    from nodes.runtime.measure import module_bytes

    source = tiny_krea2.components()["text_encoder"]
    text_bytes, tower_bytes = module_bytes(source.language_model), module_bytes(source.visual)
    assert tower_bytes > 0
    clip = _clip(env)
    (cond,) = call(registry.get("CLIPTextEncode"), env, clip=clip, text=PROMPT)
    model = clip.peek("text_encoder")
    assert model.visual is None and env.models.counters["parts"] == 0
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"language_model"}
    assert module_bytes(model) == text_bytes and _held(env) == text_bytes
    assert torch.allclose(cond[0][0], _text_reference(clip, PROMPT), atol=1e-6, rtol=0)

    (edit,) = call(registry.get("TextEncodeQwenImageEditPlus"), env, clip=clip, prompt=PROMPT, image1=_picture(1))
    theirs = reference_states(EDIT.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + PROMPT),
                              [_pil(_picture(1), 384 * 384)])
    assert torch.allclose(edit[0][0], theirs, atol=1e-6, rtol=0)
    assert model.visual is not None and env.models.counters["parts"] == 1
    assert module_bytes(model) == text_bytes + tower_bytes and _held(env) == text_bytes + tower_bytes

    # kept: another picture job (TextGenerate, outside inference mode) reads with it, nothing is rebuilt
    text, _ = call(registry.get("TextGenerate"), env, clip=clip, prompt="A red fox", max_length=3,
                   sampling_mode="off", image=_picture(2))
    assert isinstance(text, str) and env.models.counters["parts"] == 1 and _held(env) == text_bytes + tower_bytes
    (again,) = call(registry.get("CLIPTextEncode"), env, clip=clip, text=PROMPT)
    assert torch.equal(again[0][0], cond[0][0])


def test_clipsave_writes_the_tower_it_has_not_loaded_yet(env):
    """CLIPSave saves the whole Qwen3-VL (it builds the tower a text-only job left unbuilt), bit for bit."""
    from safetensors.torch import load_file

    from nodes import model_saving

    record = Called()
    call(model_saving.clip_save, env, record, clip=_clip(env), filename_prefix="clip/krea2")
    (saved,) = record.ui["clip"]
    got = load_file(str(env.paths.output.root / saved["subfolder"] / saved["filename"]))
    theirs = tiny_krea2.components()["text_encoder"].state_dict()
    assert set(got) == set(theirs) and any(k.startswith("visual.") for k in got)
    assert all(torch.equal(got[k], theirs[k]) for k in theirs)


def lora_context(env, messages: list[str]):
    """A LoraLoader node's context whose messages go to ``messages``."""
    from engine.context import NodeContext

    return NodeContext(env=env, job=None, node_id="1", node_type="LoraLoader", _progress=lambda *a: None,
                       _is_interrupted=lambda: False, _message=messages.append)


def tower_and_text_loras(root, source, tower: str, text: str, rank: int = 2):
    """Two kohya CLIP LoRAs for a Qwen-VL ``source`` (Qwen2.5-VL's or Qwen3-VL's: the same module names) in
    ``root``/loras: ``tower``.safetensors on the vision tower's first qkv (random, alpha = rank) and
    ``text``.safetensors on the language model's first up_proj (zeros). Returns (the tower weight, up, down)."""
    from safetensors.torch import save_file

    weight = source.visual.blocks[0].attn.qkv.weight
    mlp = source.language_model.layers[0].mlp.up_proj.weight
    down = torch.randn(rank, weight.shape[1], generator=torch.Generator().manual_seed(3))
    up = torch.randn(weight.shape[0], rank, generator=torch.Generator().manual_seed(4))
    loras = root / "loras"
    loras.mkdir(exist_ok=True)
    save_file({"lora_te_visual_blocks_0_attn_qkv.lora_down.weight": down,
               "lora_te_visual_blocks_0_attn_qkv.lora_up.weight": up,
               "lora_te_visual_blocks_0_attn_qkv.alpha": torch.tensor(float(rank))},
              str(loras / f"{tower}.safetensors"))
    save_file({"lora_te_language_model_layers_0_mlp_up_proj.lora_down.weight": torch.zeros(rank, mlp.shape[1]),
               "lora_te_language_model_layers_0_mlp_up_proj.lora_up.weight": torch.zeros(mlp.shape[0], rank)},
              str(loras / f"{text}.safetensors"))
    return weight, up, down


def test_a_clip_lora_or_merge_on_the_tower_builds_it_and_patches_it(env, root):
    """A LoRA naming tower modules (kohya's lora_te_visual_*) is matched against the built tower, not
    reported unmatched against the empty slot; a LoRA of the language model alone leaves it unbuilt;
    a merge of two Krea 2 CLIPs merges their towers too."""
    from nodes.lora import apply_lora

    messages: list[str] = []
    ctx = lora_context(env, messages)
    weight, up, down = tower_and_text_loras(root, tiny_krea2.components()["text_encoder"], "tower", "text")
    text_only = _clip(env)
    apply_lora(ctx, "text.safetensors", None, text_only, 0.0, 1.0)
    assert text_only.peek("text_encoder").visual is None

    clip = _clip(env)
    _, patched = apply_lora(ctx, "tower.safetensors", None, clip, 0.0, 0.5)
    assert clip.peek("text_encoder").visual is not None and "1 modules patched" in messages[-1]
    with patched.encoder("text_encoder") as te:
        got = te.visual.blocks[0].attn.qkv.weight.detach().clone()
    assert torch.allclose(got, weight + 0.5 * (up @ down), atol=1e-5, rtol=0)

    # a merge of two Krea 2 CLIPs merges their towers too, built for it
    from nodes.model_merging import merge_clips

    first, second = _clip(env), _clip(env)
    (merged,) = merge_clips(ctx, first, second, "CLIPMergeSimple 0.5", 0.5, 0.5)
    assert second.peek("text_encoder").visual is not None
    assert any(name.startswith("visual.") for name in merged.loras[-1].tables["text_encoder"])


# -- 2. Krea 2 reads pictures ----------------------------------------------------------------------


def _pil(picture: torch.Tensor, area: int) -> Image.Image:
    """The picture as diffusers' Qwen-Image-Edit pipelines size it (multiples of 32 near ``area``, Lanczos)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    pil = Image.fromarray((picture[0].numpy() * 255).round().astype(np.uint8), "RGB")
    width, height = calculate_dimensions(area, pil.width / pil.height)
    return pil.resize((width, height), resample=Image.LANCZOS)


def reference_states(text_with_blocks: str, pictures: list[Image.Image]) -> torch.Tensor:
    """transformers' Qwen3VLModel on the templated ids and the processor's pixels: the 12 taps after the
    user turn's opening, flattened as Krea 2's CONDITIONING."""
    from transformers import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=16,
                                         temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3)
    got = processor(images=pictures, return_tensors="pt")
    parts = text_with_blocks.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + p for g, p in zip(got["image_grid_thw"],
                                                                                          parts[1:]))
    tok = tiny_krea2.components()["tokenizer"]
    ids = torch.tensor([tok(text).input_ids])
    start = max(i + 3 for i in range(ids.shape[1] - 2) if ids[0, i:i + 3].tolist() == [151644, 872, 198])
    with torch.no_grad():
        out = tiny_krea2.components()["text_encoder"](
            input_ids=ids, pixel_values=got["pixel_values"], image_grid_thw=got["image_grid_thw"],
            mm_token_type_ids=(ids == 151655).int(), output_hidden_states=True)
    states = torch.stack([out.hidden_states[k] for k in krea2.TEXT_LAYERS], dim=2)[:, start:]
    return states.reshape(1, states.shape[1], -1)


def test_edit_plus_on_krea2_equals_transformers_qwen3_vl_with_the_picture(registry, env):
    clip = _clip(env)
    (cond,) = call(registry.get("TextEncodeQwenImageEditPlus"), env, clip=clip, prompt=PROMPT, image1=_picture(1))
    theirs = reference_states(EDIT.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + PROMPT),
                              [_pil(_picture(1), 384 * 384)])
    ours = cond[0][0]
    assert ours.shape == theirs.shape and ours.shape[1] > 100  # the picture's tokens are kept
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()
    (other,) = call(registry.get("TextEncodeQwenImageEditPlus"), env, clip=clip, prompt=PROMPT, image1=_picture(2))
    assert (other[0][0] - ours).abs().max() > 1e-3  # which picture matters: not vacuous


def test_two_pictures_are_named_in_order(registry, env):
    clip = _clip(env)
    (cond,) = call(registry.get("TextEncodeQwenImageEditPlus"), env, clip=clip, prompt=PROMPT, image1=_picture(1),
                   image3=_picture(3, 48, 32))
    theirs = reference_states(EDIT.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: "
                                          "<|vision_start|><|image_pad|><|vision_end|>" + PROMPT),
                              [_pil(_picture(1), 384 * 384), _pil(_picture(3, 48, 32), 384 * 384)])
    assert torch.allclose(cond[0][0], theirs, atol=1e-6, rtol=0)


def test_edit_on_krea2_puts_the_picture_in_krea2s_template(registry, env):
    """TextEncodeQwenImageEdit hands the pictures without a template: ComfyUI's Krea 2 tokenizer puts them
    before the prompt in its own template (the picture at about 1024x1024)."""
    clip = _clip(env)
    (cond,) = call(registry.get("TextEncodeQwenImageEdit"), env, clip=clip, prompt=PROMPT, image=_picture(4, 16, 16))
    theirs = reference_states(krea2.PREFIX + "<|vision_start|><|image_pad|><|vision_end|>" + PROMPT + krea2.SUFFIX,
                              [_pil(_picture(4, 16, 16), 1024 * 1024)])
    assert torch.allclose(cond[0][0], theirs, atol=1e-6, rtol=0)
    (plain,) = call(registry.get("TextEncodeQwenImageEdit"), env, clip=clip, prompt=PROMPT)
    assert torch.equal(plain[0][0], clip.encode(PROMPT)[0][0])  # no picture: CLIPTextEncode's encoding


def test_a_picture_into_a_krea2_clip_without_its_tower_is_refused_on_clip(registry, env, root):
    from safetensors.torch import save_file

    from engine.context import NodeError

    text_only = {k: v for k, v in tiny_krea2.comfy_text_state().items() if not k.startswith("visual.")}
    save_file(text_only, str(root / "text_encoders" / "tiny-qwen3vl-bare.safetensors"))
    (bare,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl-bare.safetensors", type="krea2")
    with pytest.raises(NodeError) as err:
        call(registry.get("TextEncodeQwenImageEditPlus"), env, clip=bare, prompt=PROMPT, image1=_picture(1))
    assert err.value.input_name == "clip" and "vision tower" in str(err.value)


# -- 3. TextGenerate with pictures -----------------------------------------------------------------


def reference_qwen3vl_with_picture(picture: torch.Tensor, count: int) -> list[int]:
    """transformers' Qwen3-VL generate on one picture (the tiny Krea 2's weights and head): the processor's
    pixels at Qwen3-VL's settings (16-pixel patches, mean and std 0.5, ComfyUI's pixel bounds), ComfyUI's
    Qwen3-VL template with its block and the empty think block, the 3-D positions and DeepStack its
    generate computes."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

    pil = Image.fromarray((picture[0].numpy() * 255).round().astype(np.uint8), "RGB")
    got = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=16,
                                   temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)(images=[pil], return_tensors="pt")
    pads = int(got["image_grid_thw"][0].prod()) // 4
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * pads + "<|vision_end|>A red fox<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = torch.tensor([qwen_tokenizer("3")(text, add_special_tokens=False).input_ids])
    model = Qwen3VLForConditionalGeneration(tiny_krea2.text_config()).eval()
    model.model.load_state_dict(tiny_krea2.components()["text_encoder"].state_dict())
    with torch.no_grad():
        model.lm_head.weight.copy_(krea2_head())
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=got["pixel_values"],
                             image_grid_thw=got["image_grid_thw"], mm_token_type_ids=(ids == 151655).int(),
                             do_sample=False, max_new_tokens=count, eos_token_id=STOPS, pad_token_id=ENDOFTEXT)
    return out[0, ids.shape[1]:].tolist()


def test_krea2_qwen3_vl_reads_a_picture_as_transformers_generate_does(registry, env, root):
    """TextGenerate (greedy) with a picture on Krea 2's Qwen3-VL, its file with a head of its own."""
    from safetensors.torch import save_file

    save_file({**tiny_krea2.comfy_text_state(), "lm_head.weight": krea2_head()},
              str(root / "text_encoders" / "qwen3vl-head.safetensors"))
    (clip,) = call(split_loaders.clip_loader, env, clip_name="qwen3vl-head.safetensors", type="krea2")
    picture = torch.rand(1, 72, 100, 3, generator=torch.Generator().manual_seed(1))
    expected = reference_qwen3vl_with_picture(picture, 12)
    record = Called()
    text, _ = call(registry.get("TextGenerate"), env, record, clip=clip, prompt="A red fox", max_length=12, sampling_mode="off",
                   image=picture)
    assert len(expected) == 12 and len(set(expected)) > 3
    assert text == readable(expected) and text
    assert any("12 tokens written" in m for m in record.messages)
    other, _ = call(registry.get("TextGenerate"), env, clip=clip, prompt="A red fox", max_length=12, sampling_mode="off",
                    **{"images.image_0": torch.rand(1, 72, 100, 3, generator=torch.Generator().manual_seed(2))})
    blind, _ = call(registry.get("TextGenerate"), env, clip=clip, prompt="A red fox", max_length=12, sampling_mode="off")
    assert len({text, other, blind}) == 3  # the picture is read, and which picture matters
