"""A tiny random-weight FLUX.2 [klein] for tests: the real architectures at toy sizes, in the files users have.

API:
    components()          -> diffusers parts keyed as Flux2KleinPipeline names them (cached; do not mutate):
                             transformer, vae (AutoencoderKLFlux2), text_encoder (Qwen3ForCausalLM, 28 layers
                             so layers 9/18/27 exist), tokenizer (Kiln's shipped Qwen3 one, with a chat template),
                             scheduler.
    pipeline(distilled)   -> Flux2KleinPipeline over them (is_distilled as given).
    make_models_folder(root) -> ComfyUI's split files and a diffusers folder (see there).

The tokenizer carries no chat template offline; :data:`CHAT_TEMPLATE` is Qwen3's template cut to what
Flux2KleinPipeline asks of it (one user turn, the generation prompt, thinking disabled), so diffusers
builds its prompt string through ``apply_chat_template`` independently of Kiln's own constant.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer, with_chat_template

#: Transformer: 2 heads of 32, rope axes 4 x 8 (the released 4 x 32 scaled), one double and one single block.
HEADS, HEAD_DIM, AXES = 2, 32, (8, 8, 8, 8)
QWEN = 32  # Qwen3 width; the transformer reads 3 x QWEN (layers 9, 18, 27 stacked)
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def _perturb(module: Any, scale: float) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def tokenizer() -> Any:
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    tok = with_chat_template(qwen_tokenizer("3"), CHAT_TEMPLATE)
    return tok


def make_transformer(text_width: int, guidance: bool = False) -> Any:
    """The tiny Flux2Transformer2DModel reading ``text_width``-wide prompts (a guidance embedder: [dev])."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=text_width, axes_dims_rope=AXES, guidance_embeds=guidance)


def build(seed: int = 3) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from nodes.families import flux2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = make_transformer(3 * QWEN)
        vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32,
                                 norm_num_groups=32, sample_size=64)
        qwen = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=151680, hidden_size=QWEN, intermediate_size=2 * QWEN, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
            tie_word_embeddings=True, rope_theta=1000000.0))
        _perturb(transformer, 0.15)
        _perturb(vae, 0.02)
        _perturb(qwen, 0.02)
        with torch.no_grad():  # batch-norm statistics far from (0, 1), so the normalisation is tested
            vae.bn.running_mean.copy_(torch.randn(128) * 0.5)
            vae.bn.running_var.copy_(torch.rand(128) * 2 + 0.5)
        for m in (transformer, vae, qwen):
            m.eval()
    config = {k: v for k, v in flux2.FAMILY.scheduler_config().items()
              if k not in ("_class_name", "prediction_type") and not k.startswith("kiln_")}
    return {"transformer": transformer, "vae": vae, "text_encoder": qwen, "tokenizer": tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**config)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(distilled: bool = False, cls: Any = None) -> Any:
    return quiet_pipeline(cls or "Flux2KleinPipeline", components(), is_distilled=distilled)


def save_diffusers(folder: str | Path, distilled: bool = True) -> Path:
    folder = Path(folder)
    pipeline(distilled).save_pretrained(str(folder), safe_serialization=True)
    return folder


def original_transformer() -> dict:
    """The transformer in BFL's key layout (what flux-2-klein-*.safetensors files hold)."""
    from nodes.checkpoint.flux2_keys import diffusers_to_original

    return diffusers_to_original(components()["transformer"].state_dict())


def vae_state(vae: Any = None) -> dict:
    """The VAE (``vae``, else the tiny FLUX.2's) in the original layout (flux2-vae.safetensors: LDM names
    plus ``bn.*``)."""
    from nodes.checkpoint.to_original import vae_to_original

    vae = components()["vae"] if vae is None else vae
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("bn.")}
    config = dict(vae.config, use_quant_conv=True, use_post_quant_conv=True)
    out = {k[len("first_stage_model."):]: v for k, v in vae_to_original(state, config).items()}
    out.update({f"bn.{k}": v for k, v in vae.bn.state_dict().items()})
    return out


def qwen3_state() -> dict:
    """The Qwen3 text encoder as ComfyUI's qwen_3_4b*.safetensors stores it (transformers' names)."""
    state = dict(components()["text_encoder"].state_dict())
    state.pop("lm_head.weight", None)  # tied to the embedding
    return state


def make_models_folder(root: str | Path) -> Path:
    """ComfyUI's folders with the tiny klein: diffusion_models/flux-2-klein-tiny.safetensors (BFL keys),
    flux-2-klein-tiny-prefixed.safetensors (``model.diffusion_model.``), flux-2-klein-tiny-fp8.safetensors
    (fp8 linear weights), text_encoders/qwen_3_tiny.safetensors, vae/flux2-vae-tiny.safetensors and
    diffusers/flux2-klein-tiny/ (Flux2KleinPipeline.save_pretrained, distilled)."""
    import torch

    from tiny_flux import _save

    root = Path(root)
    state = original_transformer()
    save_split_transformer(root / "diffusion_models", "flux-2-klein-tiny", state)
    _save(root / "diffusion_models" / "flux-2-klein-tiny-fp8.safetensors",
          {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()})
    _save(root / "text_encoders" / "qwen_3_tiny.safetensors", qwen3_state())
    _save(root / "vae" / "flux2-vae-tiny.safetensors", vae_state())
    save_diffusers(root / "diffusers" / "flux2-klein-tiny")
    return root
