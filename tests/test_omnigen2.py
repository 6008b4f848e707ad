"""OmniGen2 on a tiny random model: Kiln's own network against the formulas, the text path against
transformers' Qwen2.5-VL, the sampling loop against a hand-driven euler loop with DualCFGGuider's formula.

No reference implementation of OmniGen2 was run (diffusers has none; ComfyUI's and VectorSpaceLab's code
cannot run here): each part is checked against the facts of ComfyUI's source, written a second time in
tests/omnigen2_reference.py and by hand below. The tiny files (tests/tiny_omnigen2.py) load through
UNETLoader, CLIPLoader type omnigen2 and VAELoader.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import omnigen2_reference as ref
import tiny_omnigen2
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from nodes.checkpoint import omnigen2_net as net
from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.omnigen2_load import build_transformer, transformer_config
from nodes.families import omnigen2

PROMPT = "a glass teapot on a wooden table"
NEGATIVE = "blurry, low quality"
root = models_root(tiny_omnigen2.make_models_folder, "omnigen2-models")


# -- the network, part by part -------------------------------------------------------------------------


def test_positions_are_omni_rope_by_hand():
    """Caption 3 tokens, references of 2x3 and 1x2 patches, image 2x2: written out from the formulas."""
    want = [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    want += [(3, r, c) for r in range(2) for c in range(3)]  # reference 0 at shift 3 (the caption's length)
    want += [(6, 0, 0), (6, 0, 1)]  # reference 1: shift 3 + max(2, 3)
    want += [(8, r, c) for r in range(2) for c in range(2)]  # the image: 6 + max(1, 2)
    got = net.positions(3, [(2, 3), (1, 2)], (2, 2))
    assert [tuple(p) for p in got.tolist()] == want
    assert ref.position_list(3, [(2, 3), (1, 2)], (2, 2)) == want


def test_rotary_angles_and_rotation_by_hand():
    ids = torch.tensor([[5, 2, 7]])
    cos, sin = net.rotary(ids, (4, 2, 6))
    angles = [5 * 10000 ** (-0 / 4), 5 * 10000 ** (-2 / 4), 2 * 1.0, 7 * 1.0, 7 * 10000 ** (-2 / 6),
              7 * 10000 ** (-4 / 6)]
    assert torch.allclose(cos[0], torch.tensor([math.cos(a) for a in angles]), atol=1e-6)
    assert torch.allclose(sin[0], torch.tensor([math.sin(a) for a in angles]), atol=1e-6)
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 1, 12)
    out = net.rotate(x, cos, sin)[0, 0, 0]
    for j, a in enumerate(angles):  # pair j is (x[2j], x[2j+1]), turned by a
        x0, x1 = 2.0 * j, 2.0 * j + 1
        assert abs(out[2 * j] - (math.cos(a) * x0 - math.sin(a) * x1)) < 1e-4
        assert abs(out[2 * j + 1] - (math.sin(a) * x0 + math.cos(a) * x1)) < 1e-4


def test_time_embedding_is_the_scaled_sinusoid_cos_first():
    t = torch.tensor([0.25])
    got = net.timestep_sinusoid(t, 8, 1000.0)[0]
    f = [10000 ** (-j / 4) for j in range(4)]
    want = [math.cos(250 * v) for v in f] + [math.sin(250 * v) for v in f]
    assert torch.allclose(got, torch.tensor(want), atol=1e-4)


def test_patches_round_trip_in_p1_p2_c_order():
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(net.patchify(x), ref.patches(x))
    assert torch.equal(net.unpatchify(net.patchify(x), 4, 6), x)


@pytest.mark.parametrize("modulated", [True, False])
def test_block_against_direct_recomputation(modulated):
    torch.manual_seed(1)
    blk = net.Block(48, 4, 2, 80, 48, 1e-5, modulated)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x, temb = torch.randn(2, 9, 48), torch.randn(2, 48)
    ids = [(i, i % 3, i // 3) for i in range(9)]
    cos, sin = net.rotary(torch.tensor(ids), (4, 4, 4))
    with torch.no_grad():
        got = blk(x, (cos, sin), temb if modulated else None)
        want = ref.block(blk, x, ref.phases(ids, (4, 4, 4)), temb if modulated else None)
    gap = (got - want).abs().max().item()
    print(f"block (modulated={modulated}): max |diff| {gap:.2e} of {want.abs().max():.2f}")
    assert gap < 1e-4


@pytest.mark.parametrize("references", [0, 1, 2])
def test_network_against_the_formulas_written_again(references):
    """The whole forward (refiners, references with their index embedding, joint stack, output head)
    against tests/omnigen2_reference.py, two rows at two noise levels."""
    model = tiny_omnigen2.transformer()
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 5, tiny_omnigen2.TEXT, generator=g)
    refs = [torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 6, 2, generator=g)][:references]
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        got, want = model(x, sigma, ctx, refs), ref.forward(model, x, sigma, ctx, refs)
    gap = (got - want).abs().max().item()
    print(f"network with {references} references: max |diff| {gap:.2e} of {want.abs().max():.2f}")
    assert gap < 1e-3 and want.abs().max() > 1


def test_odd_latents_wrap_around_and_are_cropped():
    """ComfyUI pads an odd side by wrapping around (circular) and crops the output back."""
    model = tiny_omnigen2.transformer()
    x, ctx = torch.randn(1, 16, 5, 7), torch.randn(1, 4, tiny_omnigen2.TEXT)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular")
    with torch.no_grad():
        got, want = model(x, torch.tensor([0.5]), ctx), model(padded, torch.tensor([0.5]), ctx)[:, :, :5, :7]
    assert got.shape == (1, 16, 5, 7) and torch.allclose(got, want, atol=1e-5)


# -- the file --------------------------------------------------------------------------------------------


def test_the_file_loads_with_no_renaming_and_its_config_from_the_shapes():
    model = tiny_omnigen2.transformer()
    state = model.state_dict()
    for prefix in ("", "model.diffusion_model."):
        built = build_transformer({prefix + k: v for k, v in state.items()}, "tiny.safetensors", torch.float32)
        assert all(torch.equal(built.state_dict()[k], v) for k, v in state.items())
    released = {"x_embedder.weight": (2520, 64), "layers.0.attn.norm_q.weight": (120,),
                "layers.0.attn.to_k.weight": (840, 2520), "layers.0.feed_forward.linear_1.weight": (10240, 2520),
                "time_caption_embed.caption_embedder.0.weight": (2048,), "layers.31.attn.to_q.weight": (2520, 2520),
                "noise_refiner.1.attn.to_q.weight": (2520, 2520)}
    config = transformer_config(released)  # ComfyUI's model_detection constants for the release
    assert (config["num_attention_heads"], config["num_kv_heads"], config["num_layers"], config["num_refiner_layers"],
            config["axes_dim_rope"], config["text_feat_dim"], config["in_channels"]) == (21, 7, 32, 2, (40, 40, 40),
                                                                                         2048, 16)


def test_key_mismatches_name_the_file_and_the_keys():
    state = dict(tiny_omnigen2.transformer().state_dict())
    state.pop("layers.1.attn.to_k.weight")
    state["layers.1.attn.to_kk.weight"] = torch.zeros(24, 48)
    with pytest.raises(CheckpointError) as err:
        build_transformer(state, "broken-omnigen2.safetensors", torch.float32)
    assert "broken-omnigen2.safetensors" in str(err.value)
    assert "layers.1.attn.to_k.weight" in str(err.value) and "layers.1.attn.to_kk.weight" in str(err.value)
    state = dict(tiny_omnigen2.transformer().state_dict())
    state.pop("x_embedder.weight")
    with pytest.raises(CheckpointError, match="broken.safetensors.*x_embedder.weight"):
        build_transformer(state, "broken.safetensors", torch.float32)


def test_qwen25vl_3b_config_from_the_released_shapes():
    from nodes.checkpoint.qwen_image_load import text_config

    shapes = {"embed_tokens.weight": (151936, 2048), "norm.weight": (2048,)}
    for i in range(36):
        shapes |= {f"layers.{i}.self_attn.q_proj.weight": (2048, 2048),
                   f"layers.{i}.self_attn.k_proj.weight": (256, 2048), f"layers.{i}.self_attn.k_proj.bias": (256,),
                   f"layers.{i}.mlp.gate_proj.weight": (11008, 2048), f"layers.{i}.input_layernorm.weight": (2048,)}
    c = text_config(shapes, "qwen_2.5_vl_fp16.safetensors")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size) == (2048, 36, 16, 2, 11008, 151936)


# -- whole graphs on the files ---------------------------------------------------------------------------

SIZE_H, SIZE_W = 48, 64


def _graph(prompt: str = PROMPT, seed: int = 3, pictures: tuple[str, ...] = ("in0.png",), steps: int = 3) -> dict:
    """UNETLoader / CLIPLoader omnigen2 / VAELoader; cond1 = prompt + references, cond2 = negative +
    references, negative alone; DualCFGGuider 5 / 2 regular; BasicScheduler simple; euler."""
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_omnigen2.UNET, "weight_dtype": "default"}},
         "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_omnigen2.CLIP, "type": "omnigen2"}},
         "3": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_omnigen2.VAE}},
         "4": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
         "5": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]}},
         "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE_W, "height": SIZE_H, "batch_size": 1}},
         "11": {"class_type": "DualCFGGuider", "inputs": {"model": ["1", 0], "cond1": ["c1", 0], "cond2": ["c2", 0],
                                                          "negative": ["5", 0], "cfg_conds": 5.0,
                                                          "cfg_cond2_negative": 2.0, "style": "regular"}},
         "12": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": steps,
                                                           "denoise": 1.0}},
         "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
         "14": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
         "15": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["14", 0], "guider": ["11", 0],
                                                                  "sampler": ["13", 0], "sigmas": ["12", 0],
                                                                  "latent_image": ["10", 0]}},
         "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["3", 0]}},
         "17": {"class_type": "PreviewImage", "inputs": {"images": ["16", 0]}}}
    c1, c2 = ["4", 0], ["5", 0]
    for k, name in enumerate(pictures):
        g[f"p{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        g[f"e{k}"] = {"class_type": "VAEEncode", "inputs": {"pixels": [f"p{k}", 0], "vae": ["3", 0]}}
        g[f"r{k}"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": c1, "latent": [f"e{k}", 0]}}
        g[f"s{k}"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": c2, "latent": [f"e{k}", 0]}}
        c1, c2 = [f"r{k}", 0], [f"s{k}", 0]
    g["11"]["inputs"]["cond1"], g["11"]["inputs"]["cond2"] = c1, c2
    return g


def _pictures(env) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(((48, 40), (32, 56))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(env.paths.input.root / f"in{k}.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(env.paths.input.root / "other.png")


def _run(registry, env, **kw):
    _pictures(env)
    return run(registry, env, parse(_graph(**kw)))


def test_text_path_is_the_template_and_qwen25vl_last_hidden_state(registry, env):
    """CLIPLoader type omnigen2 on the file: the ids are ComfyUI's template around the prompt (no BOS, nothing
    dropped); the states transformers' Qwen2.5-VL last hidden state (after the final norm) on those ids."""
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    outcome = _run(registry, env, pictures=())
    states = outcome.results["4"][0][0][0]
    ids = omnigen2.template_ids(qwen_tokenizer("2.5"), PROMPT)
    tok = qwen_tokenizer("2.5")
    assert ids[:3] == tok.convert_tokens_to_ids(["<|im_start|>", "system", "Ċ"])
    assert tok.decode(ids) == omnigen2.TEMPLATE.format(PROMPT)
    assert ids[-2:] == tok.convert_tokens_to_ids(["<|im_end|>", "Ċ"])
    with torch.no_grad():
        want = tiny_omnigen2.text_encoder().model(input_ids=torch.tensor([ids])).last_hidden_state
    assert states.shape == want.shape
    gap = (states - want).abs().max().item()
    print(f"text states: max |diff| {gap:.2e}")
    assert gap < 1e-5


def test_sampling_equals_a_hand_euler_loop_with_dual_cfg(registry, env):
    """SamplerCustomAdvanced + DualCFGGuider (regular) + BasicScheduler simple, euler, on the files with one
    reference picture, equals driving the network by hand: sigmas shift(1 - i/N) with shift 2.6, the
    predictions N (negative), M (cond2: negative + reference), P (cond1: prompt + reference) combined as
    N + 2 (M - N) + 5 (P - M), x += (s' - s) v, the result taken out of FLUX's latent space."""
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.samplers.custom import Noise

    steps = 4  # 1000 / 4: ComfyUI's simple schedule picks exactly t = 1 - i / 4 from its 1000-entry table
    outcome = _run(registry, env, steps=steps)
    kiln_sigmas = outcome.results["12"][0]
    got = outcome.results["15"][0]["samples"]
    raw_ref = outcome.results["e0"][0]["samples"]
    tok, lm = qwen_tokenizer("2.5"), tiny_omnigen2.text_encoder().model
    with torch.no_grad():
        pos, neg = (lm(input_ids=torch.tensor([omnigen2.template_ids(tok, t)])).last_hidden_state
                    for t in (PROMPT, NEGATIVE))
    scale, shift = 0.3611, 0.1159  # FLUX.1's latent format (ComfyUI's latent_formats.Flux)
    reference = (raw_ref - shift) * scale
    model = tiny_omnigen2.transformer()
    x = Noise(3).draw(torch.zeros(1, 16, SIZE_H // 8, SIZE_W // 8))[0]
    t = [1 - i / steps for i in range(steps + 1)]
    sigmas = [2.6 * v / (1 + 1.6 * v) for v in t]
    assert torch.allclose(torch.as_tensor(kiln_sigmas, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64),
                          atol=1e-6), kiln_sigmas
    with torch.no_grad():
        for s, s_next in zip(sigmas, sigmas[1:]):
            sig = torch.tensor([s])
            n, m, p = model(x, sig, neg, []), model(x, sig, neg, [reference]), model(x, sig, pos, [reference])
            x = x + (s_next - s) * (n + 2.0 * (m - n) + 5.0 * (p - m))
    want = x / scale + shift
    gap = (got - want).abs().max().item()
    print(f"sampling loop: max |diff| {gap:.2e} of {want.abs().max():.2f}")
    assert gap < 1e-3 * max(1.0, want.abs().max().item())


def test_prompt_seed_and_each_reference_move_the_picture(registry, env):
    """Not vacuous: the prompt, the seed, and each of two reference pictures (and their order) change it."""
    def picture(**kw):
        return _run(registry, env, **kw).results["16"][0].numpy()

    base = picture(pictures=("in0.png", "in1.png"))
    assert base.shape == (1, SIZE_H, SIZE_W, 3) and np.isfinite(base).all()
    variants = {"prompt": picture(prompt="a red bicycle", pictures=("in0.png", "in1.png")),
                "seed": picture(seed=4, pictures=("in0.png", "in1.png")),
                "first picture": picture(pictures=("other.png", "in1.png")),
                "second picture": picture(pictures=("in0.png", "other.png")),
                "order": picture(pictures=("in1.png", "in0.png")),
                "no pictures": picture(pictures=())}
    for what, other in variants.items():
        gap = np.abs(other - base).max()
        print(f"{what}: max |diff| {gap * 255:.1f}/255")
        assert gap > 4 / 255, what


def test_six_references_are_refused_by_name():
    model = tiny_omnigen2.transformer()
    refs = [torch.zeros(1, 16, 2, 2)] * 6
    with pytest.raises(ValueError, match="at most 5"):
        model(torch.zeros(1, 16, 4, 4), torch.tensor([0.5]), torch.zeros(1, 3, tiny_omnigen2.TEXT), refs)


def test_another_reference_layout_is_refused_naming_the_input(registry, env):
    """OmniGen2 places its references by its own rule: FluxKontextMultiReferenceLatentMethod offset is refused
    (ComfyUI ignores it), naming the prompt it was set on."""
    from engine.executor import Executor

    _pictures(env)
    graph = _graph()
    graph["m"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                  "inputs": {"conditioning": graph["11"]["inputs"]["cond1"], "reference_latents_method": "offset"}}
    graph["11"]["inputs"]["cond1"] = ["m", 0]
    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status != "succeeded"
    assert "offset" in outcome.error.message and "OmniGen2" in outcome.error.message


def test_weight_dtype_fp8_keeps_fp8_linears_and_stays_close(env):
    """UNETLoader weight_dtype fp8_e4m3fn: the linear weights held in fp8, the sampled latent close to the
    default one (8-bit weights on a tiny random model: close, not equal)."""
    from flow_family_files import clip_over, fp8_sampling_gap
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    clip = clip_over(omnigen2.FAMILY, qwen_tokenizer("2.5"), tiny_omnigen2.text_encoder().model)
    gap = fp8_sampling_gap(env, tiny_omnigen2.UNET, clip, lambda net: net.layers[0].attn.to_q.weight,
                           prompt=PROMPT, negative=NEGATIVE, scheduler="simple")
    print(f"fp8 weights: relative max |diff| {gap:.3f}")
    assert 0 < gap < 0.25


def test_a_head_that_cannot_be_split_in_three_is_refused_naming_the_file():
    state = {k: v for k, v in tiny_omnigen2.transformer().state_dict().items()}
    state["layers.0.attn.norm_q.weight"] = torch.ones(16)
    with pytest.raises(CheckpointError, match="odd-head.safetensors.*width 16"):
        build_transformer(state, "odd-head.safetensors", torch.float32)


def test_bfloat16_the_gpu_dtype_stays_close_to_float32():
    """In bfloat16 (what ``auto`` picks on a GPU) the module computes in it (rotation in float32) and stays
    within a few percent of float32 on the tiny model."""
    import copy

    model = tiny_omnigen2.transformer()
    half = copy.deepcopy(model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x, ctx, refs = torch.randn(1, 16, 8, 10, generator=g), torch.randn(1, 7, 64, generator=g), \
        [torch.randn(1, 16, 6, 4, generator=g)]
    with torch.no_grad():
        full, low = model(x, torch.tensor([0.6]), ctx, refs), half(x, torch.tensor([0.6]), ctx, refs)
    assert low.dtype == torch.bfloat16
    gap = ((full - low.float()).abs().max() / full.abs().max()).item()
    print(f"bfloat16: relative max |diff| {gap:.3f}")
    assert gap < 0.05
