"""HiDream-I1 on a tiny random model, from ComfyUI's split files through the real loaders, against
HiDreamImagePipeline.

The tiny HiDream (tests/tiny_hidream.py) is written as ComfyUI's files under the template's names:
CLIP-L and CLIP-G (long CLIPs, 248 positions) with their projections, T5's encoder, Llama 3.1 as a
causal-LM file (``model.*`` and ``lm_head``). QuadrupleCLIPLoader loads them in any order; the
conditioning equals the pipeline's ``encode_prompt``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_hidream
from engine.context import NodeError
from flow_family_files import env, models_root, registry  # noqa: F401 (fixtures)
from node_call import call
from nodes import hidream_nodes
from nodes.families import hidream

PROMPT = "a red barn in a field"

root = models_root(tiny_hidream.make_models_folder, "hidream-models")


@pytest.fixture(scope="module")
def pipe():
    return tiny_hidream.pipeline()


def _quadruple(env, names=tiny_hidream.TEXTS):
    return call(hidream_nodes.quadruple_clip_loader, env, **dict(zip(hidream_nodes.CLIP_INPUTS, names)))[0]


def test_the_four_files_load_to_the_pipelines_weights_in_any_order(env):
    clip = _quadruple(env, tuple(reversed(tiny_hidream.TEXTS)))
    assert clip.family is hidream.FAMILY
    parts = tiny_hidream.components()
    for module in hidream.MODULES:
        want = parts[module].state_dict()
        with clip.encoder(module) as built:
            got = built.state_dict()
        prefix = "model." if module == "text_encoder_4" else ""
        shared = [k for k in got if prefix + k in want]
        assert len(shared) >= len(got) - 1, (module, sorted(set(got) - {k for k in shared})[:5])
        assert all(torch.equal(got[k], want[prefix + k]) for k in shared), module


@pytest.mark.parametrize("prompt", [PROMPT, "", "a long prompt, " * 60])
def test_conditioning_equals_hidream_pipelines_encode_prompt(env, pipe, prompt):
    """T5's states, every Llama layer's (batch first, as ComfyUI keeps them) and the two CLIPs' pooled
    outputs side by side, each as encode_prompt gives it at 128 tokens (a long prompt cut there)."""
    clip = _quadruple(env)
    [[t5, extra]] = clip.encode(prompt)
    with torch.no_grad():
        want_t5, _, want_llama, _, want_pooled, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=torch.device("cpu"))
    assert t5.shape == want_t5.shape == (1, hidream.TOKENS, tiny_hidream.T5)
    assert torch.allclose(t5, want_t5.float(), atol=1e-5, rtol=1e-5)
    llama = extra[hidream.LLAMA]
    assert llama.shape == (1, tiny_hidream.LLAMA_LAYERS, hidream.TOKENS, tiny_hidream.LLAMA)
    assert torch.allclose(llama, want_llama.movedim(0, 1).float(), atol=1e-5, rtol=1e-5)
    pooled = extra["pooled_output"]
    assert pooled.shape == want_pooled.shape == (1, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G)
    assert torch.allclose(pooled, want_pooled.float(), atol=1e-5, rtol=1e-5)


def test_the_prompt_matters_to_every_part(env):
    clip = _quadruple(env)
    [[a, ea]], [[b, eb]] = clip.encode(PROMPT), clip.encode("a blue car")
    assert (a - b).abs().max() > 1e-3
    assert (ea[hidream.LLAMA] - eb[hidream.LLAMA]).abs().max() > 1e-3
    assert (ea["pooled_output"] - eb["pooled_output"]).abs().max() > 1e-3


def test_a_missing_encoder_names_the_kind_and_the_input(env):
    names = list(tiny_hidream.TEXTS)
    names[3] = names[2]  # T5 twice, no Llama
    with pytest.raises(NodeError, match="Llama 3.1") as info:
        _quadruple(env, names)
    assert info.value.input_name in hidream_nodes.CLIP_INPUTS


# -- the transformer and the graph ---------------------------------------------------------------------

SIZE = 64


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, unet: str = "tiny-hidream.safetensors",
           shift: float = 3.0) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}},
        "8": {"class_type": "QuadrupleCLIPLoader", "inputs": dict(zip(hidream_nodes.CLIP_INPUTS, tiny_hidream.TEXTS))},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_hidream.VAE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "hidream"}},
    }


def _run(registry, env, graph: dict):
    from engine.workflow import parse
    from flow_family_files import run

    return run(registry, env, parse(graph)).results["6"][0].numpy()


def reference(pipe, prompt: str, negative: str, seed: int, steps: int, guidance: float):
    """HiDreamImagePipeline's picture: FlowMatchEuler at shift 3 over sigmas linspace(1, 1/N, N), which is
    euler / simple at ModelSamplingSD3 3 (the pipeline's own default spacing ends near 0 instead)."""
    with torch.no_grad():
        return pipe(prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps,
                    sigmas=list(np.linspace(1.0, 1 / steps, steps)), guidance_scale=guidance, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(seed)).images


@pytest.mark.parametrize("name", ["tiny-hidream.safetensors", "tiny-hidream-prefixed.safetensors"])
def test_unet_loader_detects_hidream_and_loads_the_weights_bit_for_bit(env, name):
    from nodes import split_loaders

    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is hidream.FAMILY
    want = tiny_hidream.components()["transformer"]
    with model.unet() as net:
        transformer = getattr(net, "kiln_network", net)
        assert dict(transformer.config) == dict(want.config)
        got = transformer.state_dict()
    assert set(got) == set(want.state_dict())
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())


def test_the_released_config_reads_from_the_released_shapes():
    """The full-size shapes (ComfyUI's detection: 16 + 32 blocks 2560 wide, 4 experts) give the release's
    config, its Llama layer table included."""
    from nodes.checkpoint import hidream_load

    shapes = {"x_embedder.proj.weight": (2560, 64), "final_layer.linear.weight": (64, 2560),
              "p_embedder.pooled_embedder.linear_1.weight": (2560, 2048),
              "caption_projection.0.linear.weight": (2560, 4096), "caption_projection.48.linear.weight": (2560, 4096)}
    shapes.update({f"double_stream_blocks.{i}.block.x": () for i in range(16)})
    shapes.update({f"single_stream_blocks.{i}.block.x": () for i in range(32)})
    shapes.update({f"double_stream_blocks.0.block.ff_i.experts.{i}.w1.weight": () for i in range(4)})
    config = hidream_load.transformer_config(shapes)
    assert config["num_attention_heads"] == 20 and config["attention_head_dim"] == 128
    assert config["num_layers"] == 16 and config["num_single_layers"] == 32 and config["num_routed_experts"] == 4
    assert config["caption_channels"] == [4096, 4096] and config["text_emb_dim"] == 2048
    assert config["llama_layers"] == list(range(32)) + [31] * 16 and config["in_channels"] == 16


def test_graph_with_cfg_and_negative_equals_hidream_pipeline(registry, env, pipe):
    ours = _run(registry, env, _graph(PROMPT, "blurry", 3, 3, 5.0))
    theirs = reference(pipe, PROMPT, "blurry", 3, 3, 5.0)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.abs(ours - _run(registry, env, _graph(PROMPT, "blurry", 4, 3, 5.0))).max() > 0.02  # the seed matters
    assert np.abs(ours - _run(registry, env, _graph("a blue car", "blurry", 3, 3, 5.0))).max() > 1 / 255  # prompt
    assert np.abs(ours - _run(registry, env, _graph(PROMPT, "blurry", 3, 3, 1.0))).max() > 1 / 255  # cfg


def test_unet_loader_fp8_holds_the_linears_in_fp8_and_the_expert_gates_in_the_compute_dtype(env):
    """The MoE gates are plain parameters (not linears): they stay float32 and the network runs; its
    output stays near the float32 weights' (fp8 rounding only)."""
    from nodes import split_loaders

    (full,) = call(split_loaders.unet_loader, env, unet_name="tiny-hidream.safetensors")
    (fp8,) = call(split_loaders.unet_loader, env, unet_name="tiny-hidream.safetensors", weight_dtype="fp8_e4m3fn")
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, hidream.TOKENS, tiny_hidream.T5, generator=g)
    extra = {"pooled_output": torch.randn(1, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G, generator=g),
             hidream.LLAMA: torch.randn(1, tiny_hidream.LLAMA_LAYERS, hidream.TOKENS, tiny_hidream.LLAMA, generator=g)}
    outs = []
    for model in (full, fp8):
        with model.unet() as net:
            kwargs = hidream.FAMILY.network_kwargs([extra], 1, (64, 64), torch.device("cpu"), torch.float32)
            outs.append(hidream.FAMILY.wrap_network(net)(x, torch.tensor([500.0]), text, **kwargs)[0])
            block = net.double_stream_blocks[0].block
            dtypes = (block.attn1.to_q.weight.dtype, block.ff_i.gate.weight.dtype)
    assert dtypes == (torch.float8_e4m3fn, torch.float32)
    assert torch.isfinite(outs[1]).all() and 0 < (outs[0] - outs[1]).abs().max() < 0.1 * outs[0].abs().max()


def test_conditioning_without_hidreams_parts_names_the_input():
    from nodes.families.base import ConditioningError

    sd3_like = {"pooled_output": torch.zeros(1, 80), "_input": "negative"}  # no Llama layers
    with pytest.raises(ConditioningError, match="QuadrupleCLIPLoader") as info:
        hidream.FAMILY.network_kwargs([sd3_like], 1, (64, 64), torch.device("cpu"), torch.float32)
    assert info.value.input_name == "negative"


def test_clip_text_encode_hidream_gives_each_encoder_its_prompt(env, pipe):
    """ComfyUI's CLIPTextEncodeHiDream: clip_l, clip_g, t5xxl, llama are the pipeline's prompt .. prompt_4."""
    clip = _quadruple(env)
    texts = {"clip_l": "a red barn", "clip_g": "a field", "t5xxl": "at dusk", "llama": "in winter"}
    ([[t5, extra]],) = call(hidream_nodes.clip_text_encode_hidream, env, clip=clip, **texts)
    with torch.no_grad():
        want_t5, _, want_llama, _, want_pooled, _ = pipe.encode_prompt(
            texts["clip_l"], texts["clip_g"], texts["t5xxl"], texts["llama"], do_classifier_free_guidance=False,
            device=torch.device("cpu"))
    assert torch.allclose(t5, want_t5.float(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(extra[hidream.LLAMA], want_llama.movedim(0, 1).float(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(extra["pooled_output"], want_pooled.float(), atol=1e-5, rtol=1e-5)
    [[same_t5, dusk]] = clip.encode("at dusk")  # T5's prompt alone: T5's part equal, Llama's not
    assert torch.equal(t5, same_t5) and not torch.allclose(extra[hidream.LLAMA], dusk[hidream.LLAMA])
    with pytest.raises(NodeError) as info:
        call(hidream_nodes.clip_text_encode_hidream, env, clip="not a clip", **texts)
    assert info.value.input_name == "clip"


def test_a_77_position_clip_gives_the_same_pooled_output_for_a_prompt_that_fits(env, root):
    """A plain CLIP-L (77 positions) in place of HiDream's long one: read at 77 tokens, its pooled output is
    the one the long CLIP with the same weights gives at 128 (the end token's state under a causal mask)."""
    from tiny_flux import _save

    state = {k: v for k, v in tiny_hidream.text_files()[tiny_hidream.TEXTS[0]].items()
             if not k.endswith("position_ids")}
    key = next(k for k in state if k.endswith("position_embedding.weight"))
    state[key] = state[key][:77].clone()
    _save(root / "text_encoders" / "clip_l_77.safetensors", state)
    short = _quadruple(env, ("clip_l_77.safetensors",) + tiny_hidream.TEXTS[1:])
    [[_, got]], [[_, want]] = short.encode(PROMPT), _quadruple(env).encode(PROMPT)
    assert torch.allclose(got["pooled_output"], want["pooled_output"], atol=1e-5, rtol=1e-5)


def test_a_hidream_transformer_under_checkpoint_loader_names_its_loaders(env, root):
    import shutil

    from nodes import loaders

    (root / "checkpoints").mkdir(exist_ok=True)
    shutil.copy(root / "diffusion_models" / "tiny-hidream.safetensors", root / "checkpoints" / "hidream.safetensors")
    with pytest.raises(NodeError, match="UNETLoader.*QuadrupleCLIPLoader") as info:
        call(loaders.checkpoint_loader, env, ckpt_name="hidream.safetensors")
    assert info.value.input_name == "ckpt_name"


def test_scaled_fp8_llama_and_t5_equal_their_dequantised_twins(env, root):
    """ComfyUI ships llama_3.1_8b_instruct and t5xxl as scaled fp8: their linears stay fp8 with their scales
    and the conditioning equals the one the dequantised files give."""
    from flow_family_files import save_state
    from test_scaled_fp8 import _effective, quantise

    files = tiny_hidream.text_files()
    names = list(tiny_hidream.TEXTS)
    for i in (2, 3):
        scaled, plain = quantise(files[names[i]])
        save_state(root / "text_encoders" / f"scaled-{names[i]}", scaled)
        save_state(root / "text_encoders" / f"dequant-{names[i]}", plain)
    a = _quadruple(env, names[:2] + [f"scaled-{n}" for n in names[2:]])
    b = _quadruple(env, names[:2] + [f"dequant-{n}" for n in names[2:]])
    with a.encoder("text_encoder_4") as x, b.encoder("text_encoder_4") as y:
        ex, ey = _effective(x), _effective(y)
        assert set(ex) == set(ey) and all(torch.equal(ex[k], ey[k]) for k in ey)
        assert x.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    [[ta, ea]], [[tb, eb]] = a.encode(PROMPT), b.encode(PROMPT)
    assert torch.allclose(ta, tb, atol=1e-5) and torch.allclose(ea[hidream.LLAMA], eb[hidream.LLAMA], atol=1e-5)


def test_a_wide_picture_takes_the_transformers_padded_path_as_the_pipeline_does(registry, env):
    """64 x 16: not square, so the transformer pads the patches to its 128 x 128 grid with a mask (one step
    with cfg; the pipeline's area set to 32 squared so that it keeps 64 x 16)."""
    graph = _graph(PROMPT, "blurry", 3, 1, 5.0)
    graph["4"]["inputs"].update(width=64, height=16)
    ours = _run(registry, env, graph)
    with torch.no_grad():
        theirs = tiny_hidream.pipeline(32)(
            prompt=PROMPT, negative_prompt="blurry", height=16, width=64, num_inference_steps=1, sigmas=[1.0],
            guidance_scale=5.0, output_type="np", generator=torch.Generator("cpu").manual_seed(3)).images
    assert ours.shape == theirs.shape == (1, 16, 64, 3)
    assert np.abs(ours - theirs).max() <= 1 / 255
