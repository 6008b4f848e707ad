"""An SD3 LoRA in diffusers' (PEFT) format on the tiny SD3, against diffusers' load_lora_weights.

Kiln's LoRA matching names no family: an SD3 transformer's own parameter names are the
names a diffusers-format SD3 LoRA uses, so such a file patches it as diffusers does.
(Kohya / Stability-layout SD3 LoRAs with fused qkv names are not mapped yet.)
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
    return root


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
    (patched,) = call(lora.lora_loader_model_only, env, model=model, lora_name="sd3-peft.safetensors",
                      strength_model=1.0)
    cond = [[pe, {"pooled_output": pp}]]
    (out,) = call(ksampler, env, model=patched, seed=3, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal",
                  positive=cond, negative=cond, latent_image={"samples": torch.zeros(1, 16, 8, 8)})
    ours = tiny_models.decode(tiny_sd3.components("large")["vae"], out["samples"])
    assert (ours - reference).abs().max() <= PIXEL_TOL
    assert (reference - plain).abs().max() > 0.003  # the LoRA changes the image
