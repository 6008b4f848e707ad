"""HiDream-I1 LoRAs in the layouts people have, through UNETLoader + LoraLoaderModelOnly / LoraLoader.

HiDream's files, ComfyUI's model and diffusers' HiDreamImageTransformer2DModel all use one set of names
(nodes.checkpoint.hidream_load), so every layout addresses the module Kiln builds by its own name:
diffusers' ``transformer.<module>`` (what HiDreamImagePipeline.load_lora_weights reads; its converter
for non-diffusers files only swaps ``diffusion_model.`` for it), ComfyUI's ``diffusion_model.<module>``,
kohya's ``lora_unet_<module with underscores>`` and SimpleTuner's ``lycoris_`` (ComfyUI's HiDream key map).

The mixture of experts: each routed expert (``ff_i.experts.N.w1/w2/w3``) and the shared experts are plain
linears, patched like any other layer (a LoRA on an expert the router does not pick for a token leaves
that token alone, as in the trained model); the router (``ff_i.gate.weight``, a bare parameter, not a
linear) is patched as a weight where a file has a factor pair or difference for it, as ComfyUI patches
every ``diffusion_model.*.weight`` (PEFT cannot target it, so diffusers' files never carry one).

The reference: the tiny transformer with ``strength * up @ down`` added by hand (alpha / rank undoes the
kohya-style files' doubled ``up``), and diffusers' own load_lora_weights + fuse_lora on the same tiny
pipeline; a graph's picture with the LoRA equals the graph's picture from the hand-merged file.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tiny_hidream
from flow_family_files import env, models_root, registry, run, save_state  # noqa: F401 (fixtures)
from flow_family_lora import (assert_refused, assert_weights_merged_by_hand, lora_file, module_shapes,
                              random_factors, weights_and_output)
from node_call import call
from nodes import hidream_nodes, lora, split_loaders
from nodes.families import hidream

UNET = "tiny-hidream.safetensors"
#: attention (image and text streams), a routed expert and the shared experts, the text stream's MLP,
#: modulation, a caption projection and the final layer: each a plain linear of the diffusers class
MODULES = ("double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_k_t",
           "double_stream_blocks.0.block.ff_i.experts.1.w1", "double_stream_blocks.0.block.ff_i.shared_experts.w2",
           "double_stream_blocks.0.block.ff_t.w3", "single_stream_blocks.0.block.attn1.to_out",
           "single_stream_blocks.0.block.ff_i.experts.3.w2", "single_stream_blocks.0.block.adaLN_modulation.1",
           "caption_projection.0.linear", "final_layer.linear")
#: the router of the first block's experts (ComfyUI patches it; diffusers cannot)
GATE = "double_stream_blocks.0.block.ff_i.gate"
FORMATS = ("peft", "comfy", "kohya", "lycoris")


def _transformer() -> torch.nn.Module:
    return tiny_hidream.components()["transformer"]


def _factors(fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down, up), seeded; the ComfyUI-style files also carry the router's."""
    names = MODULES + ((GATE,) if fmt in ("comfy", "kohya") else ())
    return random_factors(module_shapes(_transformer(), names), seed=7)


def _merged(fmt: str, strength: float) -> torch.nn.Module:
    """The tiny transformer with the file's deltas added by hand."""
    net = copy.deepcopy(_transformer())
    params = dict(net.named_parameters())
    with torch.no_grad():
        for module, (down, up) in _factors(fmt).items():
            params[module + ".weight"] += strength * up @ down
    return net


def _make(root):
    root = tiny_hidream.make_models_folder(root)
    for fmt in FORMATS:
        save_state(root / "loras" / f"{fmt}.safetensors", lora_file(_factors(fmt), fmt))
    save_state(root / "diffusion_models" / "merged.safetensors", dict(_merged("comfy", 1.0).state_dict()))
    save_state(root / "loras" / "sd1.safetensors",
               {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)})
    return root


root = models_root(_make, "hidream-lora")


def _forward(net: torch.nn.Module) -> torch.Tensor:
    """The denoiser on fixed inputs (a 4 x 4 patch grid, the tiny encoders' widths)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 8, 8, generator=g)
    text = torch.randn(1, 16, tiny_hidream.T5, generator=g)
    extra = {"pooled_output": torch.randn(1, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G, generator=g),
             hidream.LLAMA: torch.randn(1, tiny_hidream.LLAMA_LAYERS, 16, tiny_hidream.LLAMA, generator=g)}
    kwargs = hidream.FAMILY.network_kwargs([extra], 1, (64, 64), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return hidream.FAMILY.wrap_network(net)(x, torch.tensor([600.0]), text, **kwargs)[0]


def test_the_modules_exist_in_the_tiny_model():
    """The factors are built from these names: a renamed module must fail here, not pass vacuously."""
    params = dict(_transformer().named_parameters())
    assert all(m + ".weight" in params for m in MODULES + (GATE,))


@pytest.mark.parametrize("fmt", FORMATS)
def test_hidream_lora_equals_the_weights_merged_by_hand(env, fmt):
    """Every layout patches the named weights, the experts' and (ComfyUI, kohya) the router's among them."""
    _, _, moved = assert_weights_merged_by_hand(env, UNET, f"{fmt}.safetensors",
                                                lambda strength: _merged(fmt, strength), _forward)
    assert (GATE + ".weight" in moved) == (fmt in ("comfy", "kohya"))
    assert "double_stream_blocks.0.block.ff_i.experts.1.w1.weight" in moved


@pytest.mark.parametrize("fmt", ["peft", "comfy"])
def test_hidream_lora_equals_diffusers_load_lora_weights_and_fuse(env, fmt):
    """HiDreamImagePipeline.load_lora_weights + fuse_lora on a copy of the same tiny transformer holds the
    weights LoraLoaderModelOnly patches in (the ComfyUI file through diffusers' converter; the router's
    factors left out of what diffusers is given, which PEFT cannot place)."""
    from flow_family_files import quiet_pipeline

    parts = dict(tiny_hidream.components(), transformer=copy.deepcopy(_transformer()))
    pipe = quiet_pipeline("HiDreamImagePipeline", parts)
    state = {k: v for k, v in lora_file(_factors(fmt), fmt).items() if GATE not in k}
    pipe.load_lora_weights(state)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    theirs = pipe.transformer.state_dict()
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=f"{fmt}.safetensors",
                      strength_model=1.0)
    ours, _ = weights_and_output(patched, _forward)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        if not name.startswith(GATE):
            assert torch.allclose(ours[name], value, atol=1e-6, rtol=0), name
    changed = [n for n, v in theirs.items() if not torch.equal(v, _transformer().state_dict()[n])]
    assert len(changed) == len(MODULES)  # not vacuous: diffusers fused every factor pair


def _graph(unet: str, lora_name: str | None) -> dict:
    from test_hidream import _graph as hidream_graph

    graph = hidream_graph("a red barn", "blurry", 3, 2, 4.0, unet=unet)
    if lora_name is not None:
        graph["11"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}}
        graph["10"]["inputs"]["model"] = ["11", 0]
    return graph


def test_a_graph_with_the_lora_draws_the_hand_merged_models_picture(registry, env):
    """KSampler with cfg through LoraLoaderModelOnly equals the same graph on the hand-merged file within
    1/255, and the LoRA moves the picture."""
    from engine.workflow import parse

    pictures = [run(registry, env, parse(_graph(unet, name))).results["6"][0].numpy()
                for unet, name in ((UNET, "comfy.safetensors"), ("merged.safetensors", None), (UNET, None))]
    with_lora, merged, plain = pictures
    assert np.abs(with_lora - merged).max() <= 1 / 255
    assert np.abs(with_lora - plain).max() > 0.02


def test_an_sd1_lora_is_refused_naming_the_node_and_the_input(registry, env, root):
    """In a graph the error is LoraLoaderModelOnly's on ``lora_name``; LoraLoader (MODEL and CLIP) refuses it
    too, and a LoRA at another model's sizes under HiDream's names says it does not fit."""
    from engine.executor import Executor
    from engine.workflow import parse

    outcome = Executor(registry, env).run(parse(_graph(UNET, "sd1.safetensors")))
    assert outcome.status == "failed"
    assert outcome.error.node_id == "11" and outcome.error.input_name == "lora_name", outcome.error.message
    assert "hidream" in outcome.error.message and "SD LoRA" in outcome.error.message
    save_state(root / "loras" / "other-sizes.safetensors",
               {"diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_A.weight": torch.zeros(4, 3072),
                "diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_B.weight": torch.zeros(3072, 4)})
    (model,) = call(split_loaders.unet_loader, env, unet_name=UNET)
    clip = call(hidream_nodes.quadruple_clip_loader, env,
                **dict(zip(hidream_nodes.CLIP_INPUTS, tiny_hidream.TEXTS)))[0]
    assert_refused(env, model, clip, "hidream",
                   (("sd1.safetensors", "SD LoRA"), ("other-sizes.safetensors", "does not fit")))
