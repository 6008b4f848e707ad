"""TextGenerate and SaveText (nodes/text_generate.py, nodes/text_lm.py, nodes/text_sampling.py).

The encoders are tiny random causal LMs saved as ComfyUI's files are and loaded through CLIPLoader:
a Qwen3 (tests/tiny_qwen3.py at the tokenizer's full vocabulary) with its own ``lm_head.weight``
and the same without it (the head tied to the token embedding, as Qwen3-4B's), and a Qwen2.5-VL
with its vision tower, as Qwen-Image's file. Greedy output must be transformers' own
``generate(do_sample=False)`` on the same weights and the same templated ids, which the tests write
out literally; sampling must be reproducible for a seed and differ for another; the chat template,
max_length, the thinking split, the refusals, ComfyUI's two templates and SaveText are checked.
"""
from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file

import tiny_krea2
import tiny_qwen3
from engine.context import Environment, NodeError
from engine.formats import parse_document
from engine.validate import WorkflowInvalid, validate
from flow_family_files import env, registry, run  # noqa: F401 (fixtures)
from node_call import Called, call
from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
from nodes.text_lm import language_model, prompt_ids, split_thinking, templated
from nodes.text_sampling import Sampling, choose, generate, penalised

ENDOFTEXT, IM_END, THINK, UNTHINK = 151643, 151645, 151667, 151668
STOPS = [ENDOFTEXT, IM_END]
QWEN3, QWEN3_TIED, QWEN25 = "qwen_3_4b.safetensors", "qwen_3_4b_tied.safetensors", "qwen_2.5_vl_7b.safetensors"
QWEN3VL = "qwen3vl_4b.safetensors"
#: Qwen3's chat template for "A red fox" with thinking off, as Qwen's own template renders it.
FOX = "<|im_start|>user\nA red fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@functools.lru_cache(maxsize=None)
def qwen25_model():
    """A tiny Qwen2.5-VL causal LM (two-layer language model, one-block vision tower, the release's vocabulary)."""
    import tiny_qwen_image
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen_image.text_config()).eval()
        with torch.no_grad():  # larger scores than the 0.02 init gives, so the argmax is never a near tie
            model.lm_head.weight.mul_(20)
    return model


def qwen25_file_state() -> dict:
    """The model under ComfyUI's qwen_2.5_vl_7b keys: ``model.*``, ``visual.*``, ``lm_head.weight``."""
    import tiny_qwen_image

    return tiny_qwen_image.comfy_text_state(qwen25_model())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    (folder / "text_encoders").mkdir()
    state = tiny_qwen3.file_state(vocab=tiny_qwen3.FULL_VOCAB)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "text_encoders" / QWEN3))
    tied = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
    save_file(tied, str(folder / "text_encoders" / QWEN3_TIED))
    save_file(qwen25_file_state(), str(folder / "text_encoders" / QWEN25))
    save_file({**tiny_krea2.comfy_text_state(), "lm_head.weight": krea2_head()}, str(folder / "text_encoders" / QWEN3VL))
    return folder


def krea2_head() -> torch.Tensor:
    """A head of its own for the tiny Krea 2 Qwen3-VL (the tied embedding makes a tiny model repeat one token)."""
    return torch.randn(151936, tiny_krea2.TEXT, generator=torch.Generator().manual_seed(4)) * 0.5


def reference(name: str):
    """transformers' causal LM with the file's weights (the tied file: the head is the embedding)."""
    if name == QWEN25:
        return qwen25_model()
    from transformers import Qwen3ForCausalLM

    source = tiny_qwen3.model(vocab=tiny_qwen3.FULL_VOCAB)
    if name == QWEN3:
        return source
    tied = Qwen3ForCausalLM(source.config).eval()
    tied.load_state_dict(source.state_dict())
    with torch.no_grad():
        tied.lm_head.weight.copy_(tied.model.embed_tokens.weight)
    return tied


def reference_tokens(name: str, ids: list[int], count: int) -> list[int]:
    model = reference(name)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=count, eos_token_id=STOPS, pad_token_id=ENDOFTEXT)
    return out[0, len(ids):].tolist()


def readable(ids: list[int]) -> str:
    """The text of generated ids as TextGenerate reports it: the special tokens (ids 151643 on) left out
    but the reasoning markers, stripped."""
    kept = [i for i in ids if i < ENDOFTEXT or i in (THINK, UNTHINK)]
    return qwen_tokenizer("3").decode(kept).strip()


def load(registry, env, name: str, clip_type: str = "lumina2"):
    clip, = call(registry.get("CLIPLoader"), env, clip_name=name, type=clip_type)
    return clip


def node(registry, env, record: Called | None = None, **inputs):
    return call(registry.get("TextGenerate"), env, record, **inputs)


# -- greedy decoding equals transformers' generate ---------------------------------------------


@pytest.mark.parametrize("name", [QWEN3, QWEN3_TIED])
def test_greedy_qwen3_equals_transformers_generate_token_for_token(registry, env, name):
    clip = load(registry, env, name)
    spec, lm = language_model(clip.family)
    tok = clip.tokenizers[spec.tokenizer]
    ids = tok(FOX, add_special_tokens=False).input_ids
    assert prompt_ids(tok, templated(lm, "A red fox", "", False, True)) == ids
    expected = reference_tokens(name, ids, 20)
    with clip.encoder(spec.module) as encoder, clip.lm_head(spec.module) as head:
        assert (head is None) == (name == QWEN3_TIED)
        got = generate(lm.decoder(encoder), head, ids, 20, frozenset(STOPS), None)
    assert got == expected and len(got) == 20
    # the tied head scores a hidden state against the token embeddings, and the tiny model's last state
    # stays near its own token's: it repeats one token; the file's own head writes varied tokens
    assert len(set(got)) > 3 if name == QWEN3 else len(set(got)) == 1
    text, reasoning = node(registry, env, clip=clip, prompt="A red fox", max_length=20, sampling_mode="off")
    assert not readable(expected).startswith("<think>") and (readable(expected) or name == QWEN3_TIED)
    assert (text, reasoning) == (readable(expected), "")


def test_the_tied_and_the_own_head_write_different_text(registry, env):
    own = node(registry, env, clip=load(registry, env, QWEN3), prompt="A red fox", max_length=12, sampling_mode="off")
    tied = node(registry, env, clip=load(registry, env, QWEN3_TIED), prompt="A red fox", max_length=12,
                sampling_mode="off")
    assert own != tied


def test_greedy_qwen25_vl_equals_transformers_generate(registry, env):
    clip = load(registry, env, QWEN25, "qwen_image")
    spec, lm = language_model(clip.family)
    tok = clip.tokenizers[spec.tokenizer]
    ids = tok("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nA red fox<|im_end|>\n"
              "<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert prompt_ids(tok, templated(lm, "A red fox", "Be brief.", False, True)) == ids
    expected = reference_tokens(QWEN25, ids, 16)
    with clip.encoder(spec.module) as encoder, clip.lm_head(spec.module) as head:
        assert head is not None  # the file's own head, not the embedding
        got = generate(lm.decoder(encoder), head, ids, 16, frozenset(STOPS), None)
    assert got == expected and len(set(got)) > 3


@pytest.fixture()
def own_env(tmp_path: Path) -> Iterator[Environment]:
    """An Environment over ``tmp_path/models``, a models folder of the test's own: what it writes there
    leaves the module's ``root`` as its fixture made it."""
    from node_call import environment_over

    yield from environment_over(tmp_path / "models", tmp_path)


def test_a_diffusers_folder_writes_with_the_head_beside_its_encoder(registry, own_env, tmp_path):
    """A Qwen-Image diffusers folder through CheckpointLoaderSimple: the loader builds the language model
    without its head, and TextGenerate reads the head from ``text_encoder/`` (this Qwen2.5-VL does not tie
    it to the embedding, which writes other text): greedy output is transformers' generate on the weights."""
    import tiny_qwen_image
    from flow_family_files import quiet_pipeline

    folder = tmp_path / "models" / "checkpoints" / "qwen-image-folder"
    parts = {**tiny_qwen_image.components(), "text_encoder": qwen25_model()}
    quiet_pipeline("QwenImagePipeline", parts).save_pretrained(str(folder), safe_serialization=True)
    _, clip, _ = call(registry.get("CheckpointLoaderSimple"), own_env, ckpt_name=folder.name)
    spec, lm = language_model(clip.family)
    ids = prompt_ids(clip.tokenizers[spec.tokenizer], templated(lm, "A red fox", "", False, True))
    with clip.encoder(spec.module) as encoder, clip.lm_head(spec.module) as head:
        assert head is not None and torch.equal(head.weight, qwen25_model().lm_head.weight)
        got = generate(lm.decoder(encoder), head, ids, 16, frozenset(STOPS), None)
        with_embedding = generate(lm.decoder(encoder), None, ids, 16, frozenset(STOPS), None)
    assert got == reference_tokens(QWEN25, ids, 16) and got != with_embedding


def test_greedy_krea2_qwen3_vl_equals_transformers_generate(registry, env):
    """Krea 2's Qwen3-VL 4B (CLIPLoader type krea2; the template's prompt enhancer) as a chat model: ComfyUI's
    file with a head of its own, equal to transformers' Qwen3-VL causal LM token for token."""
    from transformers import Qwen3VLForConditionalGeneration

    head = krea2_head()
    clip = load(registry, env, QWEN3VL, "krea2")
    spec, lm = language_model(clip.family)
    tok = clip.tokenizers[spec.tokenizer]
    ids = prompt_ids(tok, templated(lm, "A red fox", "", False, True))
    assert ids == tok(FOX, add_special_tokens=False).input_ids  # ComfyUI's Qwen3-VL template, thinking off
    model = Qwen3VLForConditionalGeneration(tiny_krea2.text_config()).eval()
    model.model.load_state_dict(tiny_krea2.components()["text_encoder"].state_dict())
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=16, eos_token_id=STOPS, pad_token_id=ENDOFTEXT)
    expected = out[0, len(ids):].tolist()
    text, _ = node(registry, env, clip=clip, prompt="A red fox", max_length=16, sampling_mode="off")
    assert len(expected) == 16 and len(set(expected)) > 3
    assert text == readable(expected)


# -- sampling ------------------------------------------------------------------------------------


def test_sampling_is_reproducible_for_a_seed_and_differs_for_another(registry, env):
    clip = load(registry, env, QWEN3)
    on = dict(clip=clip, prompt="A red fox", max_length=16, sampling_mode="on")
    first = node(registry, env, **on, **{"sampling_mode.seed": 7})
    again = node(registry, env, **on, **{"sampling_mode.seed": 7})
    other = node(registry, env, **on, **{"sampling_mode.seed": 8})
    greedy = node(registry, env, **dict(on, sampling_mode="off"))
    assert first == again
    assert first[0] != other[0] and first[0] != greedy[0]
    huge = node(registry, env, **on, **{"sampling_mode.seed": 0xFFFFFFFFFFFFFFFF})  # ComfyUI's largest seed
    assert huge[0] and huge[0] != first[0]


def test_sampling_with_one_candidate_is_greedy(registry, env):
    """top_k 1, or min_p 1 (only the likeliest survive), leaves one token to draw: the greedy one."""
    clip = load(registry, env, QWEN3)
    base = dict(clip=clip, prompt="A red fox", max_length=10)
    greedy = node(registry, env, **base, sampling_mode="off")
    assert node(registry, env, **base, sampling_mode="on", **{"sampling_mode.top_k": 1,
                                                              "sampling_mode.repetition_penalty": 1.0}) == greedy
    assert node(registry, env, **base, sampling_mode="on", **{"sampling_mode.top_k": 0, "sampling_mode.min_p": 1.0,
                                                              "sampling_mode.repetition_penalty": 1.0}) == greedy


def test_penalties_and_filters_follow_comfyuis_rules():
    scores = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    seen = torch.tensor([True, True, False, False, False])
    assert torch.equal(penalised(scores, seen, 2.0, 0.0), torch.tensor([1.0, -2.0, 0.5, 3.0, -2.0]))
    assert torch.equal(penalised(scores, seen, 1.0, 0.5), torch.tensor([1.5, -1.5, 0.5, 3.0, -2.0]))
    none = torch.zeros(5, dtype=torch.bool)
    draws = {choose(scores, Sampling(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
                    none, torch.Generator().manual_seed(s)) for s in range(60)}
    assert draws == {0, 3}  # top-k 2 keeps exactly the two best, and both get drawn
    nucleus = {choose(scores, Sampling(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, repetition_penalty=1.0),
                      none, torch.Generator().manual_seed(s)) for s in range(60)}
    assert nucleus == {3}  # token 3 alone holds more than half the probability
    # ComfyUI's nucleus drops the token that crosses top_p: 3 holds 0.68, 3 and 0 together 0.93 > 0.8
    assert {choose(scores, Sampling(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, repetition_penalty=1.0),
                   none, torch.Generator().manual_seed(s)) for s in range(60)} == {3}
    assert {choose(scores, Sampling(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0, repetition_penalty=1.0),
                   none, torch.Generator().manual_seed(s)) for s in range(60)} == {0, 3}
    ties = torch.tensor([1.0, 1.0, 0.0, 1.0])  # top-k 2 keeps every token tied with the second best, as ComfyUI
    assert {choose(ties, Sampling(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
                   torch.zeros(4, dtype=torch.bool), torch.Generator().manual_seed(s)) for s in range(60)} == {0, 1, 3}
    # a penalty strong enough moves the best token: 3 seen and penalised below 0
    assert choose(scores, Sampling(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                   presence_penalty=2.0), torch.tensor([False, False, False, True, False]),
                  torch.Generator().manual_seed(0)) == 0


# -- the node's other inputs ----------------------------------------------------------------------


def test_max_length_is_respected(registry, env):
    clip = load(registry, env, QWEN3)
    record = Called()
    text, _ = node(registry, env, record, clip=clip, prompt="A red fox", max_length=5, sampling_mode="off")
    assert record.progress == [(i, 5) for i in range(1, 6)]
    assert "stopped at max_length 5" in record.messages[-1]
    longer, _ = node(registry, env, clip=clip, prompt="A red fox", max_length=9, sampling_mode="off")
    assert longer.startswith(text) and len(longer) > len(text)


def test_thinking_changes_the_template_and_the_output_is_split():
    lm = language_model(importlib.import_module("nodes.families.z_image").FAMILY)[1]
    assert templated(lm, "fox", "", True, True) == "<|im_start|>user\nfox<|im_end|>\n<|im_start|>assistant\n"
    assert templated(lm, "fox", "", False, True) == FOX.replace("A red fox", "fox")
    assert split_thinking("<think>\nplan it\n</think>\n\nA fox.", "fox") == ("A fox.", "plan it")
    assert split_thinking("A fox.</think> tail", "fox") == ("A fox.</think> tail", "")  # no opening: all answer
    assert split_thinking(" cut short, still reasoning", "raw <think>") == ("", "cut short, still reasoning")


def test_a_raw_prompt_ending_in_think_makes_the_output_reasoning(registry, env):
    clip = load(registry, env, QWEN3)
    raw = "<|im_start|>user\nA red fox<|im_end|>\n<|im_start|>assistant\n<think>\n"
    text, reasoning = node(registry, env, clip=clip, prompt=raw, max_length=8, sampling_mode="off",
                           use_default_template=False)
    ids = qwen_tokenizer("3")(raw, add_special_tokens=False).input_ids
    expected = readable(reference_tokens(QWEN3, ids, 8))
    assert expected and "</think>" not in expected
    assert (text, reasoning) == ("", expected.replace("<think>", "", 1).strip())


def test_system_prompt_is_used_only_with_the_default_template(registry, env):
    clip = load(registry, env, QWEN3)
    base = dict(clip=clip, prompt="A red fox", max_length=10, sampling_mode="off")
    plain = node(registry, env, **base)
    told = node(registry, env, **base, system_prompt="Answer in French.")
    assert told != plain
    raw = dict(base, use_default_template=False)
    record = Called()
    assert node(registry, env, record, **raw, system_prompt="Answer in French.") == node(registry, env, **raw)
    assert any("system_prompt is ignored" in m for m in record.messages)
    assert node(registry, env, **raw) != plain  # the raw prompt is not the templated one


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_a_clip_that_is_not_a_causal_lm_is_refused_on_clip(registry, env, family):
    from nodes.handles import ClipHandle

    fam = importlib.import_module(f"nodes.families.{family}").FAMILY
    with pytest.raises(NodeError) as err:
        node(registry, env, clip=ClipHandle(family=fam, tokenizers={}), prompt="x", max_length=4, sampling_mode="off")
    assert err.value.input_name == "clip"
    assert "TextGenerate" in str(err.value) and "cannot generate text" in str(err.value)
    assert "CLIP-L" in str(err.value)


@pytest.mark.parametrize("socket", ["image", "images.image_0", "video"])
def test_pictures_into_an_encoder_without_vision_are_refused_by_name(registry, env, socket):
    clip = load(registry, env, QWEN3)
    with pytest.raises(NodeError) as err:
        node(registry, env, clip=clip, prompt="x", max_length=4, sampling_mode="off",
             **{socket: torch.zeros(1, 8, 8, 3)})
    assert err.value.input_name == socket
    assert ("cannot read video" if socket == "video" else "no vision part") in str(err.value)


def test_audio_and_video_into_qwen25_vl_are_refused_by_name(registry, env):
    clip = load(registry, env, QWEN25, "qwen_image")
    for socket, value in (("audio", {"waveform": None}), ("video", torch.zeros(2, 8, 8, 3))):
        with pytest.raises(NodeError) as err:
            node(registry, env, clip=clip, prompt="x", max_length=4, sampling_mode="off", **{socket: value})
        assert err.value.input_name == socket and f"cannot read {socket}" in str(err.value)


def _picture(seed: int) -> torch.Tensor:
    return torch.rand(1, 56, 56, 3, generator=torch.Generator().manual_seed(seed))


def reference_with_picture(picture: torch.Tensor, count: int) -> list[int]:
    """transformers' Qwen2.5-VL generate on one picture: the processor's pixels at the release's bounds,
    one <|image_pad|> per merged 2x2 patch, the 3-D positions its generate computes."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    pil = Image.fromarray((picture[0].numpy() * 255).round().astype(np.uint8), "RGB")
    got = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056})(images=[pil],
                                                                                           return_tensors="pt")
    pads = int(got["image_grid_thw"][0].prod()) // 4
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * pads + "<|vision_end|>A red fox<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = torch.tensor([qwen_tokenizer("2.5")(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = qwen25_model().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      pixel_values=got["pixel_values"], image_grid_thw=got["image_grid_thw"],
                                      mm_token_type_ids=(ids == 151655).int(), do_sample=False,
                                      max_new_tokens=count, eos_token_id=STOPS, pad_token_id=ENDOFTEXT)
    return out[0, ids.shape[1]:].tolist()


def test_qwen25_vl_reads_a_picture_as_transformers_generate_does(registry, env):
    clip = load(registry, env, QWEN25, "qwen_image")
    expected = reference_with_picture(_picture(1), 12)
    text, _ = node(registry, env, clip=clip, prompt="A red fox", max_length=12, sampling_mode="off",
                   image=_picture(1))
    assert text == qwen_tokenizer("2.5").decode([i for i in expected if i < ENDOFTEXT]).strip() and text
    other, _ = node(registry, env, clip=clip, prompt="A red fox", max_length=12, sampling_mode="off",
                    **{"images.image_0": _picture(2)})
    blind, _ = node(registry, env, clip=clip, prompt="A red fox", max_length=12, sampling_mode="off")
    assert len({text, other, blind}) == 3  # the picture is read, and which picture matters


def test_a_raw_prompt_gets_the_picture_blocks_it_lacks():
    from nodes.text_vision import with_blocks

    user = "<|im_start|>user\nfox<|im_end|>"
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert with_blocks(user, 2) == f"<|im_start|>user\n{block}{block}fox<|im_end|>"
    assert with_blocks(f"a {block} b", 2) == f"a {block}{block} b"
    assert with_blocks("fox", 1) == block + "fox"
    for slots, count in ((2, 1), (1, 0)):  # more slots than pictures: ComfyUI refuses it too
        with pytest.raises(ValueError):
            with_blocks(block * slots, count)


def test_mtp_is_accepted_and_changes_nothing(registry, env):
    clip = load(registry, env, QWEN3)
    record = Called()
    base = dict(clip=clip, prompt="A red fox", max_length=6, sampling_mode="off")
    assert node(registry, env, record, **base, mtp="3") == node(registry, env, **base, mtp="off")
    assert any("mtp 3: no effect" in m for m in record.messages)


# -- ComfyUI's templates ----------------------------------------------------------------------------


def _template(name: str) -> dict:
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    return json.loads((folder / name).read_text(encoding="utf-8"))


def test_comfyuis_llm_qwen3_text_gen_template_runs(registry, env):
    """CLIPLoader type ltxv on qwen_3_4b (the file decides, as in ComfyUI), TextGenerate "on" with the
    template's own settings, PreviewAny showing what it wrote."""
    wf = parse_document(_template("llm_qwen3_text_gen.json"), registry).with_overrides({"7.max_length": 12})
    gen = wf.nodes["7"].inputs
    assert wf.nodes["8"].inputs["type"] == "ltxv" and wf.nodes["8"].inputs["clip_name"] == QWEN3
    assert (gen["sampling_mode"], gen["sampling_mode.temperature"], gen["sampling_mode.top_k"],
            gen["sampling_mode.seed"]) == ("on", 0.7, 64, 0)
    outcome = run(registry, env, wf)
    shown = outcome.results["5"][0]
    direct = node(registry, env, clip=load(registry, env, QWEN3, "ltxv"), prompt=gen["prompt"], max_length=12,
                  sampling_mode="on", **{k: v for k, v in gen.items() if k.startswith("sampling_mode.")})
    assert shown == direct[0] and len(shown) > 10


def test_the_krea2_template_knows_textgenerate(registry):
    from engine.context import Paths

    wf = parse_document(_template("image_krea2_turbo_t2i.json"), registry)
    gen = [n for n in wf.nodes.values() if n.type == "TextGenerate"]
    # thinking: the subgraph instance's value (False), which the frontend hands the inner widget (True in the file)
    assert len(gen) == 1 and gen[0].inputs["thinking"] is False and gen[0].inputs["use_default_template"] is True
    with pytest.raises(WorkflowInvalid) as err:  # its models are not here
        validate(wf, registry, Environment(paths=Paths.under("/nonexistent-kiln-data")))
    assert not [e for e in err.value.errors if e.type == "unknown_node_type"]
    assert not [e for e in err.value.errors if e.node_type == "TextGenerate"]


def test_an_off_mode_editor_file_maps_its_widgets():
    from engine.registry import default_registry
    from engine.workflow_ui import widget_inputs

    spec = default_registry().get("TextGenerate")
    assert widget_inputs(["hi", 64, "off", True, False, "off"], spec)[0] == {
        "prompt": "hi", "max_length": 64, "sampling_mode": "off", "thinking": True, "use_default_template": False,
        "mtp": "off"}


# -- SaveText ----------------------------------------------------------------------------------------


def test_savetext_writes_the_file_and_passes_the_text_on(registry, env):
    record = Called()
    out = call(registry.get("SaveText"), env, record, text="A red fox.", filename_prefix="notes/fox", format="txt")
    assert out == ("A red fox.",)
    entry, = record.ui["files"]
    assert entry["subfolder"] == "notes" and entry["filename"] == "fox_00001_.txt"
    assert (env.paths.output.root / "notes" / "fox_00001_.txt").read_text(encoding="utf-8") == "A red fox."
    call(registry.get("SaveText"), env, record, text='{"a": [1, 2]}', filename_prefix="fox", format="json")
    assert record.ui["files"][0]["filename"] == "fox_00001_.json"
    written = (env.paths.output.root / "fox_00001_.json").read_text(encoding="utf-8")
    assert written == '{\n  "a": [\n    1,\n    2\n  ]\n}'


def test_savetext_refuses_a_prefix_that_leaves_the_output_folder(registry, env):
    spec = registry.get("SaveText")
    assert [name for name, _ in spec.validate(env, {"filename_prefix": "../escape"})] == ["filename_prefix"]
    with pytest.raises(NodeError) as err:
        call(spec, env, text="x", filename_prefix="../../escape", format="txt")
    assert err.value.input_name == "filename_prefix"
    assert not list(env.paths.output.root.parent.glob("escape*"))


def test_savetext_editor_widgets_skip_the_linked_text():
    from engine.registry import default_registry
    from engine.workflow_ui import widget_inputs

    spec = default_registry().get("SaveText")
    assert widget_inputs(["Text/Gemini", "txt"], spec)[0] == {"filename_prefix": "Text/Gemini", "format": "txt"}
    assert spec.object_info()["input"]["required"]["text"] == ["STRING", {"forceInput": True}]


def test_an_fp8_head_is_widened_times_its_scale(tmp_path):
    from nodes.checkpoint.lm_head import build_head

    weight = torch.randn(8, 4)
    scale = torch.tensor([0.5])
    stored = (weight / scale).to(torch.float8_e4m3fn)
    save_file({"lm_head.weight": stored, "lm_head.scale_weight": scale, "model.norm.weight": torch.ones(4)},
              str(tmp_path / "head.safetensors"))
    head = build_head(tmp_path / "head.safetensors", torch.float32)
    assert head.weight.dtype == torch.float32 and head.weight.shape == (8, 4)
    assert torch.equal(head.weight, stored.float() * 0.5)
    assert (head.weight - weight).abs().max() < 0.1 * weight.abs().max()  # fp8 rounding, not a wrong scale


def test_a_folders_head_comes_from_the_weights_its_encoder_loads(tmp_path):
    """``text_encoder/`` as diffusers writes it: the full file beside an fp16 variant, or shards behind an
    index. The head is read from the file the folder loaders pick for the compute dtype
    (folders.folder_state), not whichever sorts first; a folder without one (a tied head) gives None."""
    import json

    from nodes.checkpoint.lm_head import folder_state_with_head, head_from_state

    weight, body = torch.randn(8, 4), {"model.norm.weight": torch.ones(4)}
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    save_file({**body, "lm_head.weight": weight}, str(full / "model.safetensors"))
    variant = (weight * 2).half()  # other values than the full file's, so the test sees which file was read
    save_file({**body, "lm_head.weight": variant}, str(full / "model.fp16.safetensors"))
    for dtype, want in ((torch.float32, weight), (torch.float16, variant)):
        head = head_from_state(folder_state_with_head(full, dtype), "full", dtype)
        assert torch.equal(head.weight, want), dtype
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    save_file(body, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"lm_head.weight": weight}, str(sharded / "model-00002-of-00002.safetensors"))
    shards = {"model.norm.weight": "model-00001-of-00002.safetensors",
              "lm_head.weight": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    head = head_from_state(folder_state_with_head(sharded, torch.float32), "sharded", torch.float32)
    assert torch.equal(head.weight, weight)
    save_file(body, str(full / "model.safetensors"))  # tied: the full file holds no head
    assert folder_state_with_head(full, torch.float32) is None
    assert folder_state_with_head(tmp_path / "none", torch.float32) is None
