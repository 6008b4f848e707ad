"""Lumina Image 2.0 on a tiny random model: Kiln's family and loaders against diffusers' Lumina2Pipeline.

Kiln encodes the prompt as written (the system prompt and `` <Prompt Start> `` put before the user's words by
the caller, as ComfyUI's templates and Lumina2Pipeline do) with Gemma 2 and the file's own SentencePiece
tokenizer, and samples with KSampler; diffusers runs Lumina2Pipeline from the raw prompt with
``cfg_normalization=False`` and ``cfg_trunc_ratio=1`` (plain CFG, as KSampler's; RenormCFG is ComfyUI's node
for the rest). The tiny files (tests/tiny_lumina2.py) load through UNETLoader / CLIPLoader type lumina2 /
VAELoader, the all-in-one checkpoint and the diffusers folder through CheckpointLoaderSimple; the pictures
must agree within 1/255 per pixel, and each test shows what it varies matters.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import tiny_lumina2
import tiny_models
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import (checkpoint_loader, clip_over, env, model_over, models_root,  # noqa: F401 (fixtures)
                               registry, run, save_state, txt2img_graph, unet_weights)
from node_call import Called, Recorder, call, environment_over
from nodes import loaders, split_loaders
from nodes.checkpoint import lumina2_keys
from nodes.checkpoint.spiece_file import SpieceTokenizer
from nodes.families import lumina2
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a red barn in a field"
NEGATIVE = "blurry, low quality, extra fingers"
SIZE = 64
SPLIT = {"unet_name": "tiny-lumina2.safetensors", "clip_name": "tiny-gemma_2_2b.safetensors",
         "vae_name": "tiny-flux-ae.safetensors"}

root = models_root(tiny_lumina2.make_models_folder, "lumina2-models")


def _system(prompt: str) -> str:
    """The prompt as Lumina2Pipeline writes it before encoding (its default system prompt)."""
    return lumina2.SYSTEM_PROMPTS["superior"] + lumina2.PROMPT_START + prompt


def _split_loaders(clip_name: str) -> dict:
    """UNETLoader "1", CLIPLoader "8" (type lumina2, ``clip_name``) and VAELoader "9" on the split files, as
    txt2img_graph's loader."""
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["unet_name"], "weight_dtype": "default"}},
            "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "lumina2"}},
            "9": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae_name"]}},
            "_model": ["1", 0], "_clip": ["8", 0], "_vae": ["9", 0]}


def _clip():
    parts = tiny_lumina2.components()
    return clip_over(lumina2.FAMILY, SpieceTokenizer(tiny_lumina2.spiece_model(), bos=True), parts["text_encoder"])


def kiln(prompt: str, negative: str, cfg: float, *, seed: int = 5, steps: int = 4, clip=None) -> torch.Tensor:
    clip = clip or _clip()
    model = model_over(lumina2.FAMILY, tiny_lumina2.components()["transformer"])
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, "euler", "simple", clip.encode(_system(prompt)),
                      clip.encode(negative), {"samples": torch.zeros(1, 16, 8, 8)})
    return tiny_models.decode(tiny_lumina2.components()["vae"], out["samples"])


def diffusers(prompt: str, negative: str, cfg: float, *, seed: int = 5, steps: int = 4, output_type: str = "pt"):
    with torch.no_grad():
        images = tiny_lumina2.pipeline()(
            prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps,
            guidance_scale=cfg, cfg_normalization=False, cfg_trunc_ratio=1.0, output_type=output_type,
            generator=torch.Generator().manual_seed(seed)).images
    return images.permute(0, 2, 3, 1) if output_type == "pt" else images


# -- text ----------------------------------------------------------------------------------------


def test_the_files_sentencepiece_tokenizes_as_the_pipelines_gemma_tokenizer():
    ours, theirs = SpieceTokenizer(tiny_lumina2.spiece_model(), bos=True), tiny_lumina2.components()["tokenizer"]
    for text in (_system(PROMPT), "", NEGATIVE, "a cat on a sofa, ünïcode 漢字  two  spaces\nand a line"):
        ids = ours(text)["input_ids"]
        assert ids == theirs(text).input_ids and ids[0] == 2 and 1 not in ids  # BOS first, no EOS


def test_prompt_encoding_is_the_pipelines_layer_without_padding():
    pipe = tiny_lumina2.pipeline()
    with torch.no_grad():
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True,
                                                                negative_prompt=NEGATIVE)
    clip = _clip()
    for text, states, keep in ((_system(PROMPT), embeds, mask), (NEGATIVE, neg_embeds, neg_mask)):
        (ours, extra), = clip.encode(text)
        count = int(keep.sum())
        assert ours.shape == (1, count, tiny_lumina2.CAP) and extra == {}
        assert torch.allclose(ours[0], states[0, :count], atol=1e-5)
    assert not torch.allclose(clip.encode(_system(PROMPT))[0][0][0, -3:], embeds[0, -3:] * 0)  # not vacuous


def test_weight_syntax_is_read_as_comfyui_reads_it_for_lumina2():
    """ComfyUI's Gemma tokenizer leaves weights on: BOS, each piece of one weight tokenized on its own (its BOS
    dropped), and a weighted token's state moved from the empty prompt's (BOS, then padding not attended to)
    by its weight. Written out here with transformers' tokenizer and Gemma2Model, not Kiln's code."""
    tok, gemma = tiny_lumina2.components()["tokenizer"], tiny_lumina2.components()["text_encoder"]
    pieces = [("a red barn in ", 1.0), ("a field", 1.5), (", (sunny)", 1.0)]
    ids, weights = [2], [1.0]
    for text, weight in pieces:
        got = tok(text).input_ids[1:]
        ids, weights = ids + got, weights + [weight] * len(got)
    rows = torch.tensor([ids, [2] + [0] * (len(ids) - 1)])
    mask = torch.tensor([[1] * len(ids), [1] + [0] * (len(ids) - 1)])
    with torch.no_grad():
        states = gemma(input_ids=rows, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    w = torch.tensor(weights).reshape(-1, 1)
    want = torch.where(w != 1.0, (states[0] - states[1]) * w + states[1], states[0])
    (ours, _), = _clip().encode(r"a red barn in (a field:1.5), \(sunny\)")
    assert ours.shape == (1, len(ids), tiny_lumina2.CAP) and torch.allclose(ours[0], want, atol=1e-5)
    (unit, _), = _clip().encode(r"a red barn in (a field:1.0), \(sunny\)")  # the same pieces, no weight
    moved = w.reshape(-1) != 1.0
    assert unit.shape == ours.shape and torch.allclose(unit[0, ~moved], ours[0, ~moved], atol=1e-5)
    assert (unit[0, moved] - ours[0, moved]).abs().max() > 1e-3  # the weight moves its tokens: not vacuous


def test_cliploader_type_lumina2_reads_gemma_and_its_tokenizer_from_the_file(env):
    rec = Called()
    (clip,) = call(split_loaders.clip_loader, env, rec, clip_name=SPLIT["clip_name"], type="lumina2")
    assert clip.family is lumina2.FAMILY and isinstance(clip.tokenizers["tokenizer"], SpieceTokenizer)
    want = _clip().encode(_system(PROMPT))[0][0]
    assert torch.allclose(clip.encode(_system(PROMPT))[0][0], want, atol=1e-6)


def test_a_gemma_file_without_its_tokenizer_is_refused_naming_the_input(registry, env):
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="tiny-gemma-no-tokenizer.safetensors", type="lumina2")
    assert err.value.input_name == "clip_name"
    assert "spiece_model" in str(err.value) and "tokenizer" in str(err.value)
    graph = txt2img_graph(_split_loaders("tiny-gemma-no-tokenizer.safetensors"), prompt=PROMPT, negative="", size=SIZE,
                          seed=1, steps=1, cfg=1.0, scheduler="simple")
    from engine.executor import Executor

    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status != "succeeded"
    assert outcome.error.node_id == "8" and "CLIPLoader" in outcome.error.node_type
    assert "spiece_model" in outcome.error.message


def test_an_all_in_one_checkpoint_without_its_tokenizer_is_refused_naming_the_input(env, root):
    state = {k: v for k, v in tiny_lumina2.all_in_one().items() if not k.endswith(tiny_lumina2.SPIECE)}
    save_state(root / "checkpoints" / "tiny-lumina2-aio-no-tokenizer.safetensors", state)
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-lumina2-aio-no-tokenizer.safetensors")
    assert err.value.input_name == "ckpt_name" and "text_encoders.spiece_model" in str(err.value)
    assert "UNETLoader" in str(err.value) and "CLIPLoader (type lumina2)" in str(err.value)  # what to do instead


# -- sampling --------------------------------------------------------------------------------------


def test_txt2img_with_cfg_and_negative_equals_lumina2_pipeline():
    ours = kiln(PROMPT, NEGATIVE, 4.0)
    theirs = diffusers(PROMPT, NEGATIVE, 4.0)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(PROMPT, "", 4.0)).abs().max() > 0.005  # the negative matters (real CFG)
    assert (ours - kiln(PROMPT, NEGATIVE, 4.0, seed=6)).abs().max() > 0.02  # and the seed
    assert (ours - kiln("a cat on a sofa", NEGATIVE, 4.0)).abs().max() > 0.02  # and the prompt


# -- loading -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(root, tmp_path_factory) -> dict:
    """The all-in-one checkpoint and the diffusers folder through CheckpointLoaderSimple, and the folder through
    DiffusersLoader, loaded once."""
    with contextlib.contextmanager(environment_over)(root, tmp_path_factory.mktemp("loaded")) as env:
        out = {}
        for name in ("tiny-lumina2-aio.safetensors", "tiny-lumina2-diffusers", "tiny-lumina2"):
            if name == "tiny-lumina2":
                model, clip, vae = call(loaders.diffusers_loader, env, model_path=name)
            else:
                model, clip, vae = call(loaders.checkpoint_loader, env, ckpt_name=name)
            with clip.encoder("text_encoder") as te:
                text = {k: v.detach().clone() for k, v in te.state_dict().items()}
            out[name] = {"model": model, "clip": clip, "unet": unet_weights(model), "text": text}
        return out


@pytest.mark.parametrize("name", ["tiny-lumina2.safetensors", "tiny-lumina2-prefixed.safetensors",
                                  "tiny-lumina2-diffusers-keys.safetensors", "tiny-lumina2-aio.safetensors"])
def test_split_files_all_in_one_and_folder_load_the_same_weights_bit_for_bit(env, loaded, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    want = tiny_lumina2.components()["transformer"].state_dict()
    for got in (unet_weights(model), *(entry["unet"] for entry in loaded.values())):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert model.family is lumina2.FAMILY and all(e["model"].family is lumina2.FAMILY for e in loaded.values())
    gemma = tiny_lumina2.components()["text_encoder"].state_dict()
    for entry in loaded.values():
        assert set(entry["text"]) == set(gemma) and all(torch.equal(entry["text"][k], gemma[k]) for k in gemma)


def test_key_map_matches_diffusers_converter_at_the_released_width():
    """Our map gives the keys and shapes diffusers' Lumina 2 converter gives (it splits the release's qkv
    only), and the shapes give the release's config (built on meta: no memory)."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    with torch.device("meta"):
        big = Lumina2Transformer2DModel(num_layers=2, num_refiner_layers=2, cap_feat_dim=2304)
    original = lumina2_keys.diffusers_to_original(big.state_dict())
    assert "context_refiner.1.attention_norm1.weight" in original and "final_layer.linear.weight" in original
    theirs = convert_lumina2_to_diffusers(dict(original))
    ours = lumina2_keys.original_to_diffusers(dict(original))
    assert set(theirs) == set(ours) == set(big.state_dict())
    assert all(theirs[k].shape == ours[k].shape for k in ours)
    config = lumina2_keys.transformer_config({k: tuple(v.shape) for k, v in original.items()})
    assert {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_kv_heads", "cap_feat_dim",
                                   "multiple_of", "axes_dim_rope")} == \
        {"hidden_size": 2304, "num_attention_heads": 24, "num_kv_heads": 8, "cap_feat_dim": 2304, "multiple_of": 256,
         "axes_dim_rope": (32, 32, 32)}


def test_gemma2_config_from_the_released_shapes():
    """The shapes of Gemma 2 2B (transformers' Gemma2Config defaults are that release; built on meta) give its
    config back: head width 256, 8 query and 4 key/value heads, the query scale and soft caps."""
    from transformers import Gemma2Config, Gemma2Model

    from nodes.checkpoint.gemma_text import gemma2_config

    release = Gemma2Config()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Gemma2Model(release).state_dict().items()}
    ours = gemma2_config(shapes, "gemma_2_2b")
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "attn_logit_softcapping", "rms_norm_eps",
              "sliding_window", "hidden_activation")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(release, f) for f in fields}
    assert ours.layer_types == release.layer_types


def test_weight_dtype_fp8_keeps_fp8_linears_and_stays_close(env):
    from flow_family_files import fp8_sampling_gap

    gap = fp8_sampling_gap(env, SPLIT["unet_name"], _clip(), lambda net: net.layers[0].attn.to_q.weight,
                           prompt=_system(PROMPT), negative=NEGATIVE, scheduler="simple")
    assert 0 < gap < 0.25  # 8-bit weights on a tiny random model: close, not equal


@pytest.mark.parametrize("loader", ["split", "tiny-lumina2-aio.safetensors", "tiny-lumina2-diffusers"])
def test_graphs_on_the_files_equal_lumina2_pipeline(registry, env, loader):
    """UNETLoader + CLIPLoader type lumina2 + VAELoader, the all-in-one checkpoint and the diffusers folder
    (its own tokenizer and scheduler config) through CheckpointLoaderSimple: KSampler euler cfg 4."""
    nodes = _split_loaders(SPLIT["clip_name"]) if loader == "split" else checkpoint_loader(loader)
    graph = txt2img_graph(nodes, prompt=_system(PROMPT), negative=NEGATIVE, size=SIZE, seed=5, steps=4, cfg=4.0,
                          scheduler="simple")
    ours = run(registry, env, parse(graph)).results["6"][0].numpy()
    theirs = diffusers(PROMPT, NEGATIVE, 4.0, output_type="np")
    assert np.abs(ours - theirs).max() <= PIXEL_TOL
    graph["2"]["inputs"]["text"] = _system("a cat on a sofa")
    other = run(registry, env, parse(graph)).results["6"][0].numpy()
    assert np.abs(ours - other).max() > 0.02  # the prompt matters: not vacuous


def test_a_caption_longer_than_diffusers_rotary_table_runs_and_keeps_the_shorter_positions():
    """diffusers tabulates 300 caption positions; ComfyUI computes them unbounded. A 300+ token prompt samples
    (the table made longer by diffusers' own rule), and the positions a shorter prompt uses are unchanged."""
    from diffusers.models.transformers.transformer_lumina2 import Lumina2RotaryPosEmbed

    rope = Lumina2RotaryPosEmbed(theta=10000, axes_dim=[8, 4, 4])
    before = rope.freqs_cis[0].clone()
    lumina2.room_for_caption(rope, 299)
    assert rope.freqs_cis[0].shape[0] == 300  # room enough: nothing done
    lumina2.room_for_caption(rope, 400)
    assert rope.freqs_cis[0].shape[0] >= 401 and torch.equal(rope.freqs_cis[0][:300], before)
    long_prompt = ", ".join([PROMPT] * 60)
    assert len(_clip().tokenizers["tokenizer"](_system(long_prompt))["input_ids"]) > 300
    image = kiln(long_prompt, "", 4.0, steps=2)
    assert torch.isfinite(image).all() and (image - kiln(PROMPT, "", 4.0, steps=2)).abs().max() > 0.02


# -- ComfyUI's Lumina 2 nodes ----------------------------------------------------------------------


@pytest.mark.parametrize("system", ["superior", "alignment"])
def test_cliptextencodelumina2_writes_the_system_prompt_as_lumina2_pipeline(system):
    from nodes.lumina2_nodes import clip_text_encode_lumina2

    (cond,) = clip_text_encode_lumina2(Recorder().ctx, system, PROMPT, _clip())
    with torch.no_grad():
        embeds, mask, _, _ = tiny_lumina2.pipeline().encode_prompt(
            PROMPT, do_classifier_free_guidance=False, system_prompt=lumina2.SYSTEM_PROMPTS[system])
    count = int(mask.sum())
    assert cond[0][0].shape == (1, count, tiny_lumina2.CAP)
    assert torch.allclose(cond[0][0][0], embeds[0, :count], atol=1e-5)
    other = "alignment" if system == "superior" else "superior"
    (cond_other,) = clip_text_encode_lumina2(Recorder().ctx, other, PROMPT, _clip())
    assert cond_other[0][0].shape != cond[0][0].shape or not torch.allclose(cond_other[0][0], cond[0][0])


def test_cliptextencodelumina2_names_its_bad_inputs():
    from nodes.lumina2_nodes import clip_text_encode_lumina2

    for args, name in ((("superior", PROMPT, "not a clip"), "clip"), (("best", PROMPT, _clip()), "system_prompt"),
                       (("superior", 3, _clip()), "user_prompt")):
        with pytest.raises(NodeError) as err:
            clip_text_encode_lumina2(Recorder().ctx, *args)
        assert err.value.input_name == name


def test_renormcfg_truncated_everywhere_samples_the_conditional_prediction_alone():
    """ComfyUI's RenormCFG on a Lumina 2 MODEL: with cfg_trunc 0 no step is guided, so cfg 4 with a negative
    samples what cfg 1 samples (the conditional prediction); with its defaults it moves the image."""
    from nodes.guidance_patches import renorm_cfg

    clip, model = _clip(), model_over(lumina2.FAMILY, tiny_lumina2.components()["transformer"])

    def sample(m, cfg):
        (out,) = ksampler(Recorder().ctx, m, 5, 3, cfg, "euler", "simple", clip.encode(_system(PROMPT)),
                          clip.encode(NEGATIVE), {"samples": torch.zeros(1, 16, 8, 8)})
        return out["samples"]

    (truncated,) = renorm_cfg(Recorder().ctx, model, 0.0, 1.0)
    assert torch.allclose(sample(truncated, 4.0), sample(model, 1.0), atol=1e-5)
    (renormed,) = renorm_cfg(Recorder().ctx, model, 100.0, 1.0)
    assert (sample(renormed, 4.0) - sample(model, 4.0)).abs().max() > 1e-3
