"""CLIPTextEncode's prompt rules and CLIPSetLastLayer, against the tiny models' own encoders.

The references are computed directly with the diffusers pipeline's text encoder
on hand-built token ids (windows, weights against the empty prompt), or with
``encode_prompt`` where diffusers has the feature (clip_skip).
"""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from engine.context import NodeError
from node_call import Called, call
from nodes import loaders, text
from nodes.families.text import tokenize
from nodes.prompt_syntax import parse


def _clip(env, variant):
    return call(loaders.checkpoint_loader, env, ckpt_name=tm.checkpoint_name(variant))[1]


def _encode(env, clip, prompt, rec=None):
    return call(text.clip_text_encode, env, rec or Called(), text=prompt, clip=clip)[0]


def _ids(tok, prompt):
    return tok(prompt).input_ids[1:-1]


def _window(tok, ids):
    start, end = tok("").input_ids
    row = [start] + ids + [end]
    return row + [tok.pad_token_id] * (77 - len(row))


def _last_hidden(te, rows):
    with torch.no_grad():
        return te(torch.tensor(rows)).last_hidden_state


def test_unweighted_and_escaped_prompts_equal_diffusers_exactly(tiny_env):
    """(a cat:1.0), \\(...\\) and an unbalanced '(' have no weights: the same bytes as encode_prompt."""
    clip = _clip(tiny_env, "sd1")
    pipe = tm.pipeline("sd1")
    for prompt, plain in [("(a cat:1.0) on a mat", "a cat on a mat"), (r"a \(red\) cat", "a (red) cat"),
                          ("a (red cat", "a (red cat")]:
        ours = _encode(tiny_env, clip, prompt)[0][0]
        with torch.no_grad():
            ref, _ = pipe.encode_prompt(plain, "cpu", 1, False)
        assert torch.equal(ours, ref), prompt


def test_weights_move_tokens_away_from_the_empty_prompt(tiny_env):
    clip = _clip(tiny_env, "sd1")
    pipe = tm.pipeline("sd1")
    tok, te = pipe.tokenizer, pipe.text_encoder
    cond = _encode(tiny_env, clip, "a (red:1.5) ((cat))")[0][0]
    ids = _ids(tok, "a") + _ids(tok, "red") + _ids(tok, "cat")
    assert len(ids) == 3
    h = _last_hidden(te, [_window(tok, ids)])[0]
    empty = _last_hidden(te, [_window(tok, [])])[0]
    expected = h.clone()
    expected[2] = (h[2] - empty[2]) * 1.5 + empty[2]  # position 0 is the start token
    expected[3] = (h[3] - empty[3]) * 1.21 + empty[3]
    assert cond.shape == (1, 77, h.shape[-1])
    # the empty prompt rides in the same encoder batch, so only BLAS rounding may differ
    assert torch.allclose(cond[0], expected, atol=1e-5)
    assert torch.allclose(cond[0, [0, 1] + list(range(4, 77))], h[[0, 1] + list(range(4, 77))], atol=1e-5)
    assert (cond[0, 2] - h[2]).abs().max() > 1e-2  # not vacuous: the weight changed the token


def test_long_prompt_is_encoded_in_windows(tiny_env):
    clip = _clip(tiny_env, "sd1")
    pipe = tm.pipeline("sd1")
    tok, te = pipe.tokenizer, pipe.text_encoder
    prompt = " ".join(f"word{i}" for i in range(45))  # well over 75 tokens
    ids = _ids(tok, prompt)
    assert 75 < len(ids) <= 150
    rec = Called()
    cond = _encode(tiny_env, clip, prompt, rec)[0][0]
    rows = [_window(tok, ids[:75]), _window(tok, ids[75:])]
    expected = torch.cat([_last_hidden(te, rows[:1]), _last_hidden(te, rows[1:])], dim=1)
    assert cond.shape == (1, 154, expected.shape[-1])
    assert torch.allclose(cond, expected, atol=1e-5)
    assert any(f"{len(ids)} tokens" in m and "2 windows" in m for m in rec.messages)


def test_sdxl_long_prompt_pooled_comes_from_the_first_window(tiny_env):
    clip = _clip(tiny_env, "sdxl")
    pipe = tm.pipeline("sdxl")
    prompt = "a castle " * 40
    embeds, extra = _encode(tiny_env, clip, prompt)[0]
    assert embeds.shape == (1, 154, 128)
    first = tm.pipeline("sdxl").tokenizer_2
    ids = _ids(first, prompt)[:75]
    with torch.no_grad():
        out = pipe.text_encoder_2(torch.tensor([_window(first, ids)]), output_hidden_states=True)
    assert torch.allclose(extra["pooled_output"], out.text_embeds, atol=1e-5)
    assert torch.allclose(embeds[:, :77, -out.hidden_states[-2].shape[-1]:], out.hidden_states[-2], atol=1e-5)


def test_short_weighted_piece_moves_to_the_next_window():
    """ComfyUI's packing: a piece under 8 tokens that does not fit starts the next window."""
    tok = tm.components("sd1")["tokenizer"]
    parsed = parse("cat " * 74 + "(red fox:1.3)")
    tokens = tokenize(tok, parsed)
    cat, red, fox = _ids(tok, "cat")[0], _ids(tok, "red")[0], _ids(tok, "fox")[0]
    start, end = tok("").input_ids
    assert len(tokens.windows) == 2 and all(len(w) == 77 for w in tokens.windows)
    assert tokens.windows[0] == [start] + [cat] * 74 + [end, tok.pad_token_id]
    assert tokens.windows[1][:4] == [start, red, fox, end]
    assert tokens.weights[1][1:3] == [1.3, 1.3] and set(tokens.weights[0]) == {1.0}
    # a long piece is split instead: 74 cats + 8 plain words fill window one to 75 tokens
    split = tokenize(tok, parse("cat " * 74 + "a b c d e f g h"))
    assert split.windows[0][-2] != end and split.windows[0][-1] == end and split.count == 82


def test_malformed_prompts_give_messages(tiny_env):
    clip = _clip(tiny_env, "sd1")
    rec = Called()
    _encode(tiny_env, clip, "a (red cat", rec)
    assert any("unclosed '('" in m for m in rec.messages)
    rec = Called()
    _encode(tiny_env, clip, "(red:abc) cat, embedding:easynegative", rec)
    assert any("'abc' after ':' is not a number" in m for m in rec.messages)
    assert any("embedding:easynegative left out" in m for m in rec.messages)
    rec = Called()
    _encode(tiny_env, clip, "(red:1.2) cat", rec)
    assert rec.messages == []


# -- CLIPSetLastLayer -----------------------------------------------------------------

def _diffusers_clip_skip(pipe, prompt, clip_skip):
    """diffusers' encode_prompt(clip_skip=...) rule, written out: its own code reaches the norm through
    ``text_encoder.text_model``, which transformers 5 no longer has, so it cannot be called here."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        states = te(ids, output_hidden_states=True)[-1][-(clip_skip + 1)]
        return getattr(te, "text_model", te).final_layer_norm(states)


def test_clip_skip_equals_diffusers(tiny_env):
    """SD1 at -2 is diffusers' clip_skip=1; SD2 (built without its last block) at -3 is clip_skip=1 too."""
    for variant, layer in (("sd1", -2), ("sd2", -3)):
        clip = _clip(tiny_env, variant)
        skipped = call(text.clip_set_last_layer, tiny_env, clip=clip, stop_at_clip_layer=layer)[0]
        assert skipped.layer == layer and clip.layer is None  # a new handle; the loader's is unchanged
        pipe = tm.pipeline(variant)
        for prompt in ("a photo of a cat", ""):
            ours = _encode(tiny_env, skipped, prompt)[0][0]
            with torch.no_grad():
                plain, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
            ref = _diffusers_clip_skip(pipe, prompt, 1)
            assert torch.equal(ours, ref), (variant, prompt)
            assert not torch.equal(ours, plain)
        # the family's default layer, asked for explicitly, is the default
        default = -1 if variant == "sd1" else -2
        same = call(text.clip_set_last_layer, tiny_env, clip=clip, stop_at_clip_layer=default)[0]
        assert torch.equal(_encode(tiny_env, same, "a cat")[0][0], _encode(tiny_env, clip, "a cat")[0][0])


def test_sdxl_last_layer_is_the_raw_hidden_state(tiny_env):
    """SDXL conditions without the final norm, so -1 is the last block's raw output (as ComfyUI)."""
    clip = _clip(tiny_env, "sdxl")
    last = call(text.clip_set_last_layer, tiny_env, clip=clip, stop_at_clip_layer=-1)[0]
    embeds = _encode(tiny_env, last, "a cat")[0][0]
    pipe = tm.pipeline("sdxl")
    with torch.no_grad():
        a = pipe.text_encoder(torch.tensor([_window(pipe.tokenizer, _ids(pipe.tokenizer, "a cat"))]),
                              output_hidden_states=True).hidden_states[-1]
        b = pipe.text_encoder_2(torch.tensor([_window(pipe.tokenizer_2, _ids(pipe.tokenizer_2, "a cat"))]),
                                output_hidden_states=True).hidden_states[-1]
    assert torch.equal(embeds, torch.cat([a, b], dim=-1))


def test_layers_an_encoder_cannot_give_are_errors(tiny_env):
    sd2 = _clip(tiny_env, "sd2")
    with pytest.raises(NodeError) as err:  # SD 2.x is built without OpenCLIP's last block
        call(text.clip_set_last_layer, tiny_env, clip=sd2, stop_at_clip_layer=-1)
    assert err.value.input_name == "stop_at_clip_layer" and "without its last 1 block" in str(err.value)
    sd1 = _clip(tiny_env, "sd1")  # the tiny encoder has 2 layers
    with pytest.raises(NodeError) as err:
        call(text.clip_set_last_layer, tiny_env, clip=sd1, stop_at_clip_layer=-3)
    assert err.value.input_name == "stop_at_clip_layer" and "has 2 layers" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(text.clip_set_last_layer, tiny_env, clip=sd1, stop_at_clip_layer=-30)
    assert err.value.input_name == "stop_at_clip_layer"
    # a handle that slipped past the node (a custom node set it) fails when encoding, naming the clip input
    import dataclasses

    with pytest.raises(NodeError) as err:
        _encode(tiny_env, dataclasses.replace(sd2, layer=-1), "a cat")
    assert err.value.input_name == "clip" and "CLIPSetLastLayer" in str(err.value)


def test_declarations_match_functions():
    for spec in (text.clip_text_encode, text.clip_set_last_layer):
        assert spec.signature_mismatches() == []
    inp = text.clip_set_last_layer.input("stop_at_clip_layer")
    assert (inp.default, inp.min, inp.max) == (-1, -24, -1)


# -- CLIPTextEncodeSDXL -----------------------------------------------------------------


def test_clip_text_encode_sdxl_prompts_and_sizes(tiny_env):
    from nodes.families import by_name

    clip = _clip(tiny_env, "sdxl")
    sizes = dict(width=832, height=1216, crop_w=16, crop_h=32, target_width=1024, target_height=1024)
    same = call(text.clip_text_encode_sdxl, tiny_env, clip=clip, text_g="a cat", text_l="a cat", **sizes)[0]
    plain = _encode(tiny_env, clip, "a cat")
    assert torch.equal(same[0][0], plain[0][0])
    assert torch.equal(same[0][1]["pooled_output"], plain[0][1]["pooled_output"])
    assert {k: same[0][1][k] for k in sizes} == sizes
    # the size keys reach the UNet as SDXL's time ids (original h, w, crop top, left, target h, w)
    kwargs = by_name("sdxl").network_kwargs([same[0][1]], 1, (64, 64), "cpu", torch.float32)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[1216.0, 832.0, 32.0, 16.0, 1024.0, 1024.0]]

    # different prompts: CLIP-L's half is text_l's, bigG's half and the pooled output are text_g's;
    # the shorter (one window) is padded with an empty-prompt window to the longer's two
    long_l = "a dog " * 40
    mixed = call(text.clip_text_encode_sdxl, tiny_env, clip=clip, text_g="a cat", text_l=long_l, **sizes)[0]
    width_l = tm.components("sdxl")["text_encoder"].config.hidden_size
    l_part = _encode(tiny_env, clip, long_l)[0][0][..., :width_l]
    g_cat = _encode(tiny_env, clip, "a cat")[0][0][..., width_l:]
    g_empty = _encode(tiny_env, clip, "")[0][0][..., width_l:]
    assert mixed[0][0].shape == (1, 154, 128)
    assert torch.equal(mixed[0][0][..., :width_l], l_part)
    assert torch.allclose(mixed[0][0][:, :77, width_l:], g_cat[:, :77], atol=1e-5)
    assert torch.allclose(mixed[0][0][:, 77:, width_l:], g_empty, atol=1e-5)
    assert torch.allclose(mixed[0][1]["pooled_output"], plain[0][1]["pooled_output"], atol=1e-5)
    with pytest.raises(NodeError) as err:
        call(text.clip_text_encode_sdxl, tiny_env, clip=_clip(tiny_env, "sd1"), text_g="a", text_l="a", **sizes)
    assert err.value.input_name == "clip" and "SDXL" in str(err.value)
    assert text.clip_text_encode_sdxl.signature_mismatches() == []
