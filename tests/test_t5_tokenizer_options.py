"""ComfyUI's T5TokenizerOptions (nodes/text.py; the length rule in nodes/families/flux.py).

On a FLUX CLIP, T5 must see the prompt, its end token, min_padding pad tokens, then padding up
to min_length, never cut (checked against the tiny T5 called directly); (0, 512) is FLUX's
own length (the unpatched bytes), (0, 0) another image; bad input is named; a CLIP without T5
comes back unchanged; a ComfyUI API prompt with the node validates and runs.
"""
from __future__ import annotations

import pytest
import torch

import tiny_flux
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import env, registry, run  # noqa: F401 (env and registry are fixtures)
from node_call import Called, call
from nodes import split_loaders
from nodes.families.flux import t5_length
from nodes.text import clip_text_encode, t5_tokenizer_options
from test_flux_loading import PROMPT, SPLIT, root  # noqa: F401 (a fixture)


def _clip(env):
    clip, = call(split_loaders.dual_clip_loader, env, clip_name1=SPLIT["clip_l"], clip_name2=SPLIT["t5xxl"],
                 type="flux")
    return clip


def _encode(env, clip, text=PROMPT):
    cond, = call(clip_text_encode, env, text=text, clip=clip)
    return cond[0][0]


def _options(env, clip, min_padding, min_length):
    patched, = call(t5_tokenizer_options, env, clip=clip, min_padding=min_padding, min_length=min_length)
    return patched


def test_the_length_rule():
    assert t5_length(10, (5, 0)) == 15  # prompt and end token, then min_padding
    assert t5_length(10, (5, 300)) == 300  # padded up to min_length
    assert t5_length(600, (0, 256)) == 600  # never cut


def test_t5_sees_the_prompt_padded_by_the_options(env):
    clip = _clip(env)
    parts = tiny_flux.components("dev")
    tok, t5 = parts["tokenizer_2"], parts["text_encoder_2"]
    ids = tok(PROMPT).input_ids  # the prompt and its end token
    for padding, length in (((5, 0), len(ids) + 5), ((3, 40), 40), ((0, 0), len(ids))):
        states = _encode(env, _options(env, clip, *padding))
        with torch.no_grad():
            expected = t5(torch.tensor([ids + [tok.pad_token_id] * (length - len(ids))]))[0]
        assert states.shape[1] == length
        assert torch.allclose(states, expected, atol=1e-5)
    weighted = _encode(env, _options(env, clip, 4, 0), "a (lighthouse:1.4) on a cliff")
    assert weighted.shape[1] == len(ids) + 4  # the weighted path pads by the same rule


def test_a_long_prompt_is_not_cut(env):
    long = " ".join(["lighthouse"] * 300)
    clip = _clip(env)
    plain, patched = _encode(env, clip, long), _encode(env, _options(env, clip, 0, 0), long)
    assert plain.shape[1] == 512 and patched.shape[1] > 512


def _txt2img(registry, env, options=None, seed=3):
    graph = {
        "10": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["diffusion_model"],
                                                      "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": SPLIT["t5xxl"], "clip_name2": SPLIT["clip_l"],
                                                          "type": "flux"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["11", 0]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "31": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": seed, "steps": 3, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["26", 0], "negative": ["26", 0],
                                                    "latent_image": ["27", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["31", 0], "vae": ["12", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}},
    }
    if options is not None:
        graph["40"] = {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["11", 0], "min_padding": options[0],
                                                                      "min_length": options[1]}}
        graph["6"]["inputs"]["clip"] = ["40", 0]
    return run(registry, env, parse(graph)).results["8"][0]


def test_a_comfyui_prompt_with_the_node_runs_and_flux_s_own_length_is_the_identity(registry, env):
    plain = _txt2img(registry, env)
    assert _txt2img(registry, env, (0, 512)).numpy().tobytes() == plain.numpy().tobytes()
    assert (_txt2img(registry, env, (0, 0)) - plain).abs().max().item() > 1e-3


def test_at_cfg_above_1_prompts_of_different_lengths_sample(env):
    """Positive and negative padded differently (the options on one side only) still sample, and
    differently from both sides at FLUX's own length."""
    from nodes.sampling import ksampler
    from test_flux import Recorder, _model

    clip = _clip(env)
    (short,) = call(clip_text_encode, env, text=PROMPT, clip=_options(env, clip, 0, 0))
    (full,) = call(clip_text_encode, env, text=PROMPT, clip=clip)
    (negative,) = call(clip_text_encode, env, text="blurry", clip=clip)
    assert short[0][0].shape[1] < full[0][0].shape[1] == negative[0][0].shape[1]

    def sample(positive):
        (out,) = ksampler(Recorder().ctx, _model("dev"), 5, 2, 2.0, "euler", "normal", positive, negative,
                          {"samples": torch.zeros(1, 16, 8, 8)})
        return out["samples"]

    ours = sample(short)
    assert torch.isfinite(ours).all() and (ours - sample(full)).abs().max() > 1e-3


@pytest.mark.parametrize("args,bad", [((-1, 0), "min_padding"), ((0, 10001), "min_length"),
                                      ((1.5, 0), "min_padding"), ((0, "long"), "min_length")])
def test_bad_input_is_named(env, args, bad):
    with pytest.raises(NodeError) as err:
        _options(env, _clip(env), *args)
    assert err.value.input_name == bad


def test_a_clip_without_t5_is_returned_unchanged_and_a_non_clip_is_refused(tiny_env):
    from nodes import loaders

    _, clip, _ = call(loaders.checkpoint_loader, tiny_env, ckpt_name="tiny-sd1.safetensors")
    rec = Called()
    same, = call(t5_tokenizer_options, tiny_env, rec, clip=clip, min_padding=3, min_length=10)
    assert same is clip and "no T5" in rec.messages[0]
    with pytest.raises(NodeError) as err:
        call(t5_tokenizer_options, tiny_env, clip="text", min_padding=0, min_length=0)
    assert err.value.input_name == "clip"


def test_the_node_has_comfyui_s_schema(registry):
    spec = registry.get("T5TokenizerOptions")
    assert spec.category == "_for_testing/conditioning" and [o.type for o in spec.outputs] == ["CLIP"]
    assert [(i.name, i.type, i.default, i.min, i.max) for i in spec.inputs] == [
        ("clip", "CLIP", spec.inputs[0].default, None, None), ("min_padding", "INT", 0, 0, 10000),
        ("min_length", "INT", 0, 0, 10000)]
