"""A tiny random-weight Ideogram 4 for tests: the real architectures at toy sizes, in the files users have.

API:
    components()      -> diffusers parts keyed as Ideogram4Pipeline names them (cached; do not mutate):
                         transformer, unconditional_transformer (another random draw), vae (the pipeline's:
                         batch-norm statistics in token order), text_encoder (Qwen3VLModel, 36 layers so the
                         taps 0..35 exist), tokenizer (Kiln's Qwen3 one with Qwen3-VL's text chat template),
                         scheduler; and flux2_vae (the same VAE with FLUX.2's statistic order: the VAE file).
    pipeline()        -> Ideogram4Pipeline over them.
    original_state(which) -> a transformer in ComfyUI's key layout ("transformer" or "unconditional_transformer").
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer, save_state, with_chat_template

HEADS, HEAD_DIM, LAYERS = 2, 32, 2
#: Qwen3-VL's chat template for text turns (what apply_chat_template renders for the pipeline's messages).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{{ c['text'] }}"
                 "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def token_order(flux2_stat: Any) -> Any:
    """FLUX.2's 128 batch-norm statistics (channel, row, column per patch) in token order (row, column, channel)."""
    return flux2_stat.reshape(32, 2, 2).permute(1, 2, 0).reshape(-1)


def build(seed: int = 5) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Transformer2DModel
    from transformers import Qwen3VLModel

    from nodes.checkpoint.ideogram4_keys import rope_sections
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from tiny_krea2 import TEXT, _perturb, text_config

    def dit() -> Any:
        net = Ideogram4Transformer2DModel(
            in_channels=128, num_layers=LAYERS, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
            intermediate_size=96, adaln_dim=32, llm_features_dim=13 * TEXT, mrope_section=rope_sections(HEAD_DIM))
        _perturb(net, 0.1)
        return net

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, unconditional = dit(), dit()
        text_encoder = Qwen3VLModel(text_config())
        _perturb(text_encoder, 0.02)
        vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32,
                                 norm_num_groups=32, sample_size=64)
        _perturb(vae, 0.02)
        with torch.no_grad():  # statistics far from (0, 1) so their order matters
            vae.bn.running_mean.copy_(torch.randn(128) * 0.5)
            vae.bn.running_var.copy_(torch.rand(128) * 2 + 0.5)
    pipeline_vae = copy.deepcopy(vae)
    with torch.no_grad():
        pipeline_vae.bn.running_mean.copy_(token_order(vae.bn.running_mean))
        pipeline_vae.bn.running_var.copy_(token_order(vae.bn.running_var))
    for m in (transformer, unconditional, text_encoder, vae, pipeline_vae):
        m.eval().requires_grad_(False)
    tokenizer = with_chat_template(qwen_tokenizer("3"), CHAT_TEMPLATE)
    return {"transformer": transformer, "unconditional_transformer": unconditional, "vae": pipeline_vae,
            "flux2_vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler()}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    parts = {k: v for k, v in components().items() if k != "flux2_vae"}
    return quiet_pipeline("Ideogram4Pipeline", parts)


def original_state(which: str = "transformer") -> dict:
    from nodes.checkpoint.ideogram4_keys import diffusers_to_original

    return {k: v.contiguous() for k, v in diffusers_to_original(components()[which].state_dict()).items()}


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny Ideogram 4: diffusion_models/tiny-ideogram4.safetensors (ComfyUI's
    keys, bare), tiny-ideogram4-prefixed.safetensors (``model.diffusion_model.``),
    tiny-ideogram4-diffusers-keys.safetensors, tiny-ideogram4_unconditional.safetensors,
    text_encoders/tiny-qwen3vl_8b.safetensors (ComfyUI's Qwen3-VL layout), vae/tiny-flux2-vae.safetensors."""
    import tiny_flux2
    from tiny_krea2 import comfy_text_state

    root = Path(root)
    parts = components()
    save_split_transformer(root / "diffusion_models", "tiny-ideogram4", original_state(),
                           {k: v.contiguous() for k, v in parts["transformer"].state_dict().items()})
    save_state(root / "diffusion_models" / "tiny-ideogram4_unconditional.safetensors",
               original_state("unconditional_transformer"))
    save_state(root / "text_encoders" / "tiny-qwen3vl_8b.safetensors", comfy_text_state(parts["text_encoder"]))
    save_state(root / "vae" / "tiny-flux2-vae.safetensors", tiny_flux2.vae_state(parts["flux2_vae"]))
    return root
