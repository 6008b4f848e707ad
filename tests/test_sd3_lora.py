"""An SD3 LoRA in diffusers' (PEFT) format on the tiny SD3, against diffusers' load_lora_weights.

Kiln's LoRA matching names no family: an SD3 transformer's own parameter names are the
names a diffusers-format SD3 LoRA uses, so such a file patches it as diffusers does.
A kohya-style file of the same deltas under Stability's module names (fused qkv: the
downs stacked, the ups block-diagonal) is mapped back by nodes.checkpoint.sd3_keys and
gives the same image.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import tiny_models
import tiny_sd3
from node_call import call, environment_over
from nodes import lora, split_loaders
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.2", "ff_context.net.2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("sd3-lora")
    tiny_sd3._save(root / "diffusion_models" / "tiny-sd3-large.safetensors", tiny_sd3.original_transformer("large"))
    transformer = copy.deepcopy(tiny_sd3.components("large")["transformer"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    state = {k: v.detach().clone() * (0.3 if "lora_B" in k else 1.0)
             for k, v in get_peft_model_state_dict(transformer).items()}
    StableDiffusion3Pipeline.save_lora_weights(str(root / "loras"), transformer_lora_layers=state,
                                               weight_name="sd3-peft.safetensors")
    _save_kohya(state, root / "loras" / "sd3-kohya.safetensors")
    return root


def _save_kohya(peft: dict, path: Path) -> None:
    """The same deltas under Stability's names, kohya's keys (``lora_unet_joint_blocks_0_x_block_attn_qkv``)."""
    from safetensors.torch import save_file

    from nodes.checkpoint.sd3_keys import lora_modules

    factors = {k[: -len(".lora_A.weight")]: (v, peft[k.replace("lora_A", "lora_B")])
               for k, v in peft.items() if k.endswith(".lora_A.weight")}
    shapes = {k: tuple(v.shape) for k, v in tiny_sd3.components("large")["transformer"].state_dict().items()}
    out, used = {}, set()
    for original, target in lora_modules(shapes).items():
        names = [target] if isinstance(target, str) else [name for name, _ in target]
        modules = [n[: -len(".weight")] for n in names]
        if not all(m in factors for m in modules):
            continue
        downs, ups = zip(*(factors[m] for m in modules))
        base = "lora_unet_" + original.replace(".", "_")
        out[base + ".lora_down.weight"] = torch.cat(downs).contiguous()
        out[base + ".lora_up.weight"] = torch.block_diag(*ups).contiguous()
        out[base + ".alpha"] = torch.tensor(float(sum(d.shape[0] for d in downs)))  # alpha = rank: scale 1
        used.update(modules)
    assert used == set(factors), sorted(set(factors) - used)[:5]
    save_file(out, str(path))


@pytest.fixture()
def env(root, tmp_path):
    yield from environment_over(root, tmp_path)


def _embeds():
    with torch.no_grad():
        return tiny_sd3.pipeline("large").encode_prompt("a red barn", None, None, device="cpu",
                                                         do_classifier_free_guidance=False)


def test_a_diffusers_format_sd3_lora_equals_load_lora_weights(env, root):
    from diffusers import StableDiffusion3Pipeline

    pe, _, pp, _ = _embeds()
    parts = dict(tiny_sd3.components("large"), transformer=copy.deepcopy(tiny_sd3.components("large")["transformer"]))
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, height=64, width=64, num_inference_steps=4,
                        guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                        output_type="pt").images.permute(0, 2, 3, 1)

    plain = theirs()
    pipe.load_lora_weights(str(root / "loras"), weight_name="sd3-peft.safetensors")
    reference = theirs()
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-sd3-large.safetensors")
    cond = [[pe, {"pooled_output": pp}]]
    for name in ("sd3-peft.safetensors", "sd3-kohya.safetensors"):
        (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name=name, strength_model=1.0)
        (out,) = call(ksampler, env, model=patched, seed=3, steps=4, cfg=1.0, sampler_name="euler",
                      scheduler="normal", positive=cond, negative=cond,
                      latent_image={"samples": torch.zeros(1, 16, 8, 8)})
        ours = tiny_models.decode(tiny_sd3.components("large")["vae"], out["samples"])
        assert (ours - reference).abs().max() <= PIXEL_TOL, name
    assert (reference - plain).abs().max() > 0.003  # the LoRA changes the image


def test_original_names_cover_the_transformer_with_the_swapped_halves():
    from nodes.checkpoint.sd3_keys import lora_modules

    transformer = tiny_sd3.components("medium")["transformer"]
    shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    names = lora_modules(shapes)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert names["final_layer.adaLN_modulation.1"] == (("norm_out.linear.weight", ((width, 2 * width), (0, width))),)
    last = transformer.config.num_layers - 1
    assert names[f"joint_blocks.{last}.context_block.adaLN_modulation.1"][0][1] == ((width, 2 * width), (0, width))
    assert names["joint_blocks.0.x_block.attn2.qkv"][2] == ("transformer_blocks.0.attn2.to_v.weight",
                                                            ((2 * width, 3 * width),))
    assert f"joint_blocks.{last}.context_block.attn.proj" not in names  # the last block's context side ends early
    assert "joint_blocks.1.x_block.attn2.qkv" not in names  # Medium's second attention only where it has one
    covered = {n for v in names.values() for n in ([v] if isinstance(v, str) else [p for p, _ in v])}
    linear = {k for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    assert linear - covered == set()  # every linear weight has its original name
