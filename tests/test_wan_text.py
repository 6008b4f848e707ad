"""UMT5-XXL (Wan 2.1 / ChronoEdit's text encoder) through CLIPLoader type wan, against ChronoEditPipeline.

The tiny UMT5 (tests/tiny_wan.py) is saved as Comfy-Org's umt5_xxl file: transformers' encoder names and the
SentencePiece model as a ``spiece_model`` uint8 tensor, also as ComfyUI's scaled fp8 with its dequantised twin.
Kiln tokenizes with sentencepiece from the file; the pipeline with transformers' T5 tokenizer built from the
same model (the ids are checked equal first), so the two tokenizers are independent.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tiny_wan
from flow_family_files import env, models_root, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.checkpoint.load import CheckpointError

PROMPTS = ("make the sky blue and add a red balloon", "an old  man with a hat, zebra!", "")
CLIP = "tiny-umt5_xxl.safetensors"


def _make(root: Path) -> Path:
    from test_scaled_fp8 import quantise

    state = tiny_wan.comfy_text_state()
    save_state(root / "text_encoders" / CLIP, state)
    weights = {k: v for k, v in state.items() if k != "spiece_model"}
    scaled, plain = quantise(weights)
    for name, part in (("tiny-umt5-fp8_scaled.safetensors", scaled), ("tiny-umt5-dequant.safetensors", plain)):
        save_state(root / "text_encoders" / name, {**part, "spiece_model": state["spiece_model"]})
    save_state(root / "text_encoders" / "tiny-umt5-no-tokenizer.safetensors", weights)
    bad = dict(state, spiece_model=torch.arange(64, dtype=torch.uint8))
    save_state(root / "text_encoders" / "tiny-umt5-bad-tokenizer.safetensors", bad)
    return root


root = models_root(_make, "wan-text-models")


def _pipeline_embeds(prompt: str) -> torch.Tensor:
    """ChronoEditPipeline.encode_prompt (its ftfy cleaning, absent here, as the identity on these prompts)."""
    from diffusers import ChronoEditPipeline
    from diffusers.pipelines.chronoedit import pipeline_chronoedit

    parts = tiny_wan.components()
    pipe = ChronoEditPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], image_encoder=None,
                              image_processor=None, transformer=None, vae=None, scheduler=None)
    old = getattr(pipeline_chronoedit, "ftfy", None)
    pipeline_chronoedit.ftfy = SimpleNamespace(fix_text=lambda text: text)
    try:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512,
                                           device=torch.device("cpu"))
    finally:
        if old is None:
            del pipeline_chronoedit.ftfy
        else:
            pipeline_chronoedit.ftfy = old
    return embeds


def test_the_files_tokenizer_gives_the_pipelines_ids():
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=tiny_wan.spiece_model())
    tok = tiny_wan.hf_tokenizer()
    for prompt in PROMPTS:
        assert sp.encode(prompt) + [1] == tok(prompt).input_ids


def test_clip_loader_type_wan_equals_encode_prompt(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="wan")
    assert clip.family.name == "wan21"
    with clip.encoder("text_encoder") as module:
        assert type(module).__name__ == "UMT5EncoderModel"
        got = module.state_dict()
    want = tiny_wan.components()["text_encoder"].state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    states = {}
    for prompt in PROMPTS:
        cond = clip.encode(prompt)
        states[prompt] = cond[0][0]
        reference = _pipeline_embeds(prompt)
        assert cond[0][0].shape == reference.shape == (1, 512, tiny_wan.TEXT)
        assert torch.allclose(cond[0][0], reference, atol=1e-5), (cond[0][0] - reference).abs().max()
        kept = len(tiny_wan.hf_tokenizer()(prompt).input_ids)
        assert cond[0][0][0, kept:].abs().max() == 0 and cond[0][0][0, kept - 1].abs().max() > 0
    assert not torch.allclose(states[PROMPTS[0]], states[PROMPTS[1]], atol=1e-3)  # the prompt matters


def test_weighted_prompt_changes_only_through_its_weights(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="wan")
    plain = clip.encode("a red balloon")[0][0]
    same = clip.encode("(a red balloon:1.0)")[0][0]
    heavy = clip.encode("(a red balloon:1.3)")[0][0]
    assert torch.allclose(plain, same, atol=1e-5)
    assert not torch.allclose(plain, heavy, atol=1e-3)
    kept = int((plain[0].abs().amax(dim=-1) > 0).sum())
    assert 3 < kept < 512 and heavy[0, kept:].abs().max() == 0  # still zero after the prompt and its end token


def test_fp8_scaled_umt5_equals_its_dequantised_twin(env):
    from test_scaled_fp8 import _compare

    (a,) = call(split_loaders.clip_loader, env, clip_name="tiny-umt5-fp8_scaled.safetensors", type="wan")
    (b,) = call(split_loaders.clip_loader, env, clip_name="tiny-umt5-dequant.safetensors", type="wan")
    with a.encoder("text_encoder") as x, b.encoder("text_encoder") as y:
        layers, _ = _compare(x, y)
    assert layers >= 10  # every block's q, k, v, o, wi_0, wi_1, wo
    assert torch.allclose(a.encode(PROMPTS[0])[0][0], b.encode(PROMPTS[0])[0][0], atol=1e-5)


@pytest.mark.parametrize("name, says", [("tiny-umt5-no-tokenizer.safetensors", "no tokenizer (spiece_model)"),
                                        ("tiny-umt5-bad-tokenizer.safetensors", "not a SentencePiece model")])
def test_a_file_without_a_readable_tokenizer_is_named(env, name, says):
    with pytest.raises(Exception) as info:
        call(split_loaders.clip_loader, env, clip_name=name, type="wan")
    assert says in str(info.value) and name in str(info.value)
