"""Ovis-Image on a tiny random model, from ComfyUI's split files through the real loaders, against
OvisImagePipeline.

The tiny Ovis-Image (tests/tiny_ovis.py) is written as ComfyUI's files: the transformer in ComfyUI's
FLUX-style layout (bare and under ``model.diffusion_model.``) and in diffusers', Ovis 2.5's Qwen3 as a
``model.*`` text-encoder file, FLUX's VAE. Graphs (UNETLoader, CLIPLoader type ovis, VAELoader,
KSampler euler/simple) equal the pipeline's images within 1/255 per pixel (its scheduler the template's
fixed shift of 3; its guidance_scale is KSampler's cfg); each parity test shows what it varies matters.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_ovis
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint import ovis_keys
from nodes.families import ovis

PROMPT = "a red barn in a field"
NEGATIVE = "blurry, low quality"
SIZE = 64

root = models_root(tiny_ovis.make_models_folder, "ovis-models")


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, clip_type: str = "ovis") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_ovis.UNET, "weight_dtype": "default"}},
        "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_ovis.TEXT, "type": clip_type}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_ovis.VAE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ovis"}},
    }


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["6"][0].numpy()


def reference(prompt: str, negative: str, seed: int, steps: int, guidance: float, size: int = SIZE) -> np.ndarray:
    """OvisImagePipeline's picture (the template's sampling: fixed shift 3, euler)."""
    with torch.no_grad():
        return tiny_ovis.pipeline()(
            prompt=prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
            guidance_scale=guidance, output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images


# -- the key layout and loading ------------------------------------------------------------------------


def test_comfyuis_layout_round_trips_and_its_gated_mlps_compute_as_diffusers_ff():
    """ComfyUI's Ovis names (a gated "yak" MLP: gate_proj / up_proj / down_proj; txt_norm; no vector_in or
    guidance_in), and ComfyUI's math on them (down(silu(gate x) * up x); a single block's linear1 MLP
    part as silu(second half) * first half) equals diffusers' feed-forwards on the converted weights."""
    original = tiny_ovis.original_transformer()
    assert ovis_keys.ORIGINAL_MARKER in original and "txt_norm.weight" in original
    assert not any(k.startswith(("vector_in.", "guidance_in.", "double_blocks.0.img_mlp.0.")) for k in original)
    model = tiny_ovis.components()["transformer"]
    back = ovis_keys.original_to_diffusers(original)
    want = model.state_dict()
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    names = ovis.FAMILY.original_names(model)  # what ComfyUI's per-block merge nodes match
    assert set(names.values()) <= set(original) and set(names) == set(want)
    assert names["transformer_blocks.0.ff.net.0.proj.weight"] == "double_blocks.0.img_mlp.up_proj.weight"
    assert names["timestep_embedder.linear_1.bias"] == "time_in.in_layer.bias"
    x = torch.randn(2, 5, tiny_ovis.DIM, generator=torch.Generator().manual_seed(0))

    def lin(name: str, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(v, original[f"{name}.weight"], original[f"{name}.bias"])

    silu = torch.nn.functional.silu
    with torch.no_grad():
        block = model.transformer_blocks[0]
        for mlp, ff in (("img_mlp", block.ff), ("txt_mlp", block.ff_context)):
            b = f"double_blocks.0.{mlp}"
            comfy = lin(f"{b}.down_proj", silu(lin(f"{b}.gate_proj", x)) * lin(f"{b}.up_proj", x))
            assert torch.allclose(comfy, ff(x), atol=1e-6)
        single = model.single_transformer_blocks[0]
        half = single.mlp_hidden_dim
        mlp = lin("single_blocks.0.linear1", x)[..., 3 * tiny_ovis.DIM:]
        states, gate = single.proj_mlp(x).split([half, half], dim=-1)
        assert torch.allclose(silu(mlp[..., half:]) * mlp[..., :half], single.act_mlp(gate) * states, atol=1e-6)


@pytest.mark.parametrize("name", [tiny_ovis.UNET, "tiny-ovis-prefixed.safetensors",
                                  "tiny-ovis-diffusers-keys.safetensors"])
def test_unet_loader_detects_ovis_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is ovis.FAMILY and model.scheduler_config["shift"] == 3.0
    want = tiny_ovis.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_unet_loader_fp8_weight_dtype_holds_the_linears_in_fp8(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name=tiny_ovis.UNET, weight_dtype="fp8_e4m3fn")
    with model._use_unet() as net:
        assert net.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.float8_e4m3fn
        assert net.context_embedder_norm.weight.dtype == torch.float32


def test_fp8_scaled_file_equals_its_dequantised_twin(env, root):
    """ComfyUI's scaled fp8 (every linear scaled): the scales follow the renames, the gated MLP's two scales
    stack with their weights' rows into diffusers' fused projection."""
    from flow_family_files import save_state
    from test_scaled_fp8 import _compare, quantise

    scaled, plain = quantise(tiny_ovis.original_transformer(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "ovis-fp8_scaled.safetensors", scaled)
    save_state(root / "diffusion_models" / "ovis-fp8-dequant.safetensors", plain)
    (a,) = call(split_loaders.unet_loader, env, unet_name="ovis-fp8_scaled.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="ovis-fp8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers, _ = _compare(x, y)
    assert layers >= 10  # every block's linears, the fused MLP inputs among them


# -- conditioning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "", "a long prompt " * 120])
def test_conditioning_equals_ovis_pipelines_encode_prompt(env, prompt):
    """256 tokens always: the prompt's states after the 28 prefix tokens, zero rows for the padding
    (the pipeline's, which the transformer reads), cut where the pipeline cuts a long prompt."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=tiny_ovis.TEXT, type="ovis")
    assert clip.family is ovis.FAMILY
    [[ours, _]] = clip.encode(prompt)
    with torch.no_grad():
        theirs = tiny_ovis.pipeline().encode_prompt(prompt, do_classifier_free_guidance=False,
                                                    device=torch.device("cpu"))[0]
    assert ours.shape == theirs.shape == (1, ovis.MAX_TOKENS, 48)
    assert torch.allclose(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    assert bool(ours[0, -1].eq(0).all()) == (len(prompt) < 500)  # padding is zeros; a long prompt fills all


def test_the_template_is_qwen3s_chat_template_with_thinking_off():
    tok = tiny_ovis.components()["tokenizer"]
    rendered = tok.apply_chat_template([{"role": "user", "content": ovis.SYSTEM + PROMPT}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
    assert rendered == ovis.TEMPLATE.format(PROMPT)
    ids = tok(ovis.TEMPLATE.format(PROMPT), add_special_tokens=False).input_ids
    # the pipeline's 28 dropped tokens end at "background"; the system line's colon is kept before the prompt
    assert tok.decode(ids[ovis.PREFIX_TOKENS - 1:ovis.PREFIX_TOKENS + 2]) == " background: a"


# -- sampling ------------------------------------------------------------------------------------------


def test_graph_with_cfg_and_negative_equals_ovis_pipeline(registry, env):
    """KSampler euler/simple at cfg 5 (the template's) with a negative: the pipeline's guidance_scale 5."""
    ours = _run(registry, env, _graph(PROMPT, NEGATIVE, 3, 4, 5.0))
    gap = np.abs(ours - reference(PROMPT, NEGATIVE, 3, 4, 5.0)).max()
    print(f"ovis gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _run(registry, env, _graph(PROMPT, NEGATIVE, 4, 4, 5.0))).max() > 0.02  # the seed matters
    assert np.abs(ours - _run(registry, env, _graph("a blue car", NEGATIVE, 3, 4, 5.0))).max() > 1 / 255  # the prompt


def test_a_diffusers_folder_through_checkpoint_loader_equals_ovis_pipeline(registry, env):
    graph = _graph(PROMPT, NEGATIVE, 6, 3, 4.0)
    for k in ("1", "8", "9"):
        del graph[k]
    graph["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-ovis-diffusers"}}
    graph["2"]["inputs"]["clip"] = graph["3"]["inputs"]["clip"] = ["1", 1]
    graph["6"]["inputs"]["vae"] = ["1", 2]
    ours = _run(registry, env, graph)
    assert np.abs(ours - reference(PROMPT, NEGATIVE, 6, 3, 4.0)).max() <= 1 / 255
    assert np.abs(ours - reference(PROMPT, NEGATIVE, 6, 3, 2.0)).max() > 1 / 255  # the cfg matters: not vacuous


# -- bad input ---------------------------------------------------------------------------------------


def test_wrong_files_name_the_node_input_family_and_loader(env, root):
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="tiny-t5xxl.safetensors", type="ovis")
    assert err.value.input_name == "clip_name"
    assert "'ovis' needs Qwen3, got tiny-t5xxl.safetensors (T5-XXL)" in str(err.value)
    text_file = (root / "text_encoders" / tiny_ovis.TEXT).read_bytes()
    (root / "diffusion_models" / "te-as-unet.safetensors").write_bytes(text_file)
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="te-as-unet.safetensors")
    assert err.value.input_name == "unet_name"
    assert "holds a text encoder" in str(err.value) and "CLIPLoader" in str(err.value)
    (root / "checkpoints" / "ovis-aio.safetensors").write_bytes(
        (root / "diffusion_models" / "tiny-ovis-prefixed.safetensors").read_bytes())
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="ovis-aio.safetensors")
    assert err.value.input_name == "ckpt_name"
    assert "Ovis-Image transformer" in str(err.value) and "CLIPLoader (type ovis)" in str(err.value)


def test_ovis_text_encoder_under_type_lumina2_is_refused_at_the_sampler(registry, env):
    """ovis_2.5 is a Qwen3 file, so CLIPLoader type lumina2 loads it as Z-Image's encoder; its width fits
    the transformer but its states are not Ovis's: KSampler names the input instead of drawing nonsense."""
    from engine.executor import Executor

    outcome = Executor(registry, env).run(parse(_graph(PROMPT, NEGATIVE, 3, 2, 5.0, clip_type="lumina2")))
    assert outcome.status == "failed"
    error = outcome.error  # both prompts are Z-Image's; the first one the call reads is named
    assert error.node_id == "5" and error.input_name in ("positive", "negative"), error.message
    assert "CLIPLoader type ovis" in error.message


def test_a_flux_file_is_flux_and_a_truncated_ovis_file_names_the_missing_key(env, root):
    from safetensors.torch import save_file

    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux.safetensors")
    assert model.family.name == "flux"
    state = tiny_ovis.original_transformer()
    del state["double_blocks.0.img_mlp.up_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "diffusion_models" / "broken-ovis.safetensors"))
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="broken-ovis.safetensors")
    assert err.value.input_name == "unet_name"
    assert "Ovis-Image" in str(err.value) and "img_mlp" in str(err.value)


def test_conditioning_of_another_width_names_the_input():
    from nodes.families.base import ConditioningError

    net = ovis.FAMILY.wrap_network(tiny_ovis.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), torch.zeros(1, 7, 4096))
    assert err.value.input_name == "positive" and "type ovis" in str(err.value)
