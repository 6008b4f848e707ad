"""AuraFlow LoRAs in the layouts people download, through UNETLoader + LoraLoaderModelOnly + KSampler.

Random non-zero factors on both attention sides of a joint block, both feed-forwards, the single block's
attention and feed-forward, the modulations, the caption projection, the output projection and the final
modulation, written as diffusers/PEFT names (``transformer.``), as ComfyUI's original-layout names
(``diffusion_model.double_layers.0.attn.w2q``) and as kohya's (``lora_unet_double_layers_0_attn_w2q``, ComfyUI's
generic rule for original names). The final modulation's halves are (shift, scale) in the original layout and
(scale, shift) in diffusers', so its ``up`` rows swap between them. The reference is the tiny transformer with
each delta merged by hand (W + scale * up @ down), sampled the same way; every file must agree within 1/255.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_auraflow
from flow_family_files import env  # noqa: F401 (a fixture)
from flow_family_lora import assert_lora_equals_merged, lora_root, merged_modules, module_shapes, random_factors, sample
from nodes.families import auraflow
from nodes.handles import ModelHandle

#: diffusers module -> original module (written out here from fal's names, not Kiln's table)
RENAMES = {"joint_transformer_blocks.0.attn.to_q": "double_layers.0.attn.w2q",
           "joint_transformer_blocks.0.attn.add_v_proj": "double_layers.0.attn.w1v",
           "joint_transformer_blocks.0.attn.to_add_out": "double_layers.0.attn.w1o",
           "joint_transformer_blocks.0.ff.linear_1": "double_layers.0.mlpX.c_fc1",
           "joint_transformer_blocks.0.ff_context.out_projection": "double_layers.0.mlpC.c_proj",
           "joint_transformer_blocks.0.norm1_context.linear": "double_layers.0.modC.1",
           "single_transformer_blocks.0.attn.to_out.0": "single_layers.0.attn.w1o",
           "single_transformer_blocks.0.ff.linear_2": "single_layers.0.mlp.c_fc2",
           "single_transformer_blocks.0.norm1.linear": "single_layers.0.modCX.1",
           "context_embedder": "cond_seq_linear", "proj_out": "final_linear", "norm_out.linear": "modF.1"}
SWAPPED = "norm_out.linear"


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return random_factors(module_shapes(tiny_auraflow.components()["transformer"], list(RENAMES)), seed=31)


def _original(factors: dict) -> dict:
    """The same deltas under the original names; the final modulation's ``up`` with its halves swapped."""
    out = {}
    for name, (down, up) in factors.items():
        if name == SWAPPED:
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        out[RENAMES[name]] = (down, up)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    factors = _factors()
    original = _original(factors)
    return lora_root(tmp_path_factory.mktemp("auraflow-lora"), "tiny-auraflow.safetensors",
                     tiny_auraflow.original_transformer(), {"peft": factors, "comfy": original, "kohya": original})


def _sample(env, model: ModelHandle) -> torch.Tensor:
    import test_auraflow

    return sample(env, model, test_auraflow._clip(), test_auraflow._decode, steps=3, cfg=3.5, scheduler="simple",
                  latent=(1, 4, 8, 8))


def _merged(strength: float) -> ModelHandle:
    return merged_modules(auraflow.FAMILY, tiny_auraflow.components()["transformer"], _factors(), strength)


@pytest.mark.parametrize("fmt", ["peft", "comfy", "kohya"])
def test_auraflow_lora_equals_the_merged_weights(env, fmt):
    assert_lora_equals_merged(env, "tiny-auraflow.safetensors", f"{fmt}.safetensors", lambda model: _sample(env, model),
                              _merged)


def test_original_names_cover_every_parameter():
    net = tiny_auraflow.components()["transformer"]
    names = auraflow.FAMILY.original_names(net)
    assert names["joint_transformer_blocks.0.attn.add_q_proj.weight"] == "double_layers.0.attn.w1q.weight"
    assert names["norm_out.linear.weight"] == "modF.1.weight" and names["register_tokens"] == "register_tokens"
    assert set(names) == {n for n, _ in net.named_parameters()}
