"""A tiny random-weight HiDream-I1 for tests: the real architectures at toy sizes.

API:
    components()        -> diffusers parts keyed as HiDreamImagePipeline names them (cached; do not mutate):
                           transformer, vae, text_encoder (CLIP-L), text_encoder_2 (CLIP-G), text_encoder_3 (T5),
                           text_encoder_4 (Llama, LlamaForCausalLM), their tokenizers, scheduler.
    pipeline()          -> HiDreamImagePipeline over them.
    text_files()        -> {file name: state} of the four encoders as ComfyUI's files hold them.
    make_models_folder(root) -> ComfyUI's folders with the tiny files under the template's names.

The CLIPs have 248 positions as HiDream's long CLIPs do (the pipeline pads their prompts to 128 tokens);
the Llama has the full Llama 3 vocabulary so real prompts tokenize, and the tokenizer is Kiln's
(nodes.checkpoint.llama_tokenizer); the VAE is the tiny FLUX's (HiDream uses FLUX.1's ae.safetensors).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_flux
from flow_family_files import quiet_pipeline, save_split_transformer

CLIP_L, CLIP_G, T5, LLAMA = 32, 48, 96, 32
LLAMA_LAYERS = 2
#: The names ComfyUI's templates ask for.
TEXTS = ("clip_l_hidream.safetensors", "clip_g_hidream.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors",
         "llama_3.1_8b_instruct_fp8_scaled.safetensors")
VAE = "ae.safetensors"
UNETS = ("hidream_i1_dev_fp8.safetensors", "hidream_i1_fast_fp8.safetensors", "hidream_i1_full_fp8.safetensors")
#: The E1 templates' transformers (E1 files are I1's key for key: the tiny one serves).
E1_UNETS = ("hidream_e1_1_bf16.safetensors", "hidream_e1_full_bf16.safetensors")


def _clip(kind: str, width: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from nodes.checkpoint import clip_configs

    return CLIPTextModelWithProjection(CLIPTextConfig(
        **dict(clip_configs.text_config_defaults(kind), max_position_embeddings=248), hidden_size=width,
        intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=1, projection_dim=width))


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from nodes.checkpoint import llama_text

    config = LlamaConfig(vocab_size=128256, hidden_size=LLAMA, intermediate_size=2 * LLAMA,
                         num_hidden_layers=LLAMA_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=LLAMA // 4, rms_norm_eps=llama_text.RMS_EPS,
                         max_position_embeddings=llama_text.MAX_POSITIONS,
                         rope_parameters=dict(llama_text.ROPE), tie_word_embeddings=False, use_cache=False,
                         bos_token_id=128000, eos_token_id=128009)
    return LlamaForCausalLM(config)


def build(seed: int = 3) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImageTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from nodes.checkpoint.llama_tokenizer import llama3_tokenizer
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=1, caption_channels=[T5, LLAMA], text_emb_dim=CLIP_L + CLIP_G,
            num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
            llama_layers=list(range(LLAMA_LAYERS)))
        clip_l, clip_g = _clip("openai", CLIP_L), _clip("openclip", CLIP_G)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=T5, d_kv=8, d_ff=2 * T5, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False))
        llama = _llama()
        for m in (transformer, clip_l, clip_g, t5, llama):
            tiny_flux._perturb(m, 0.05)
            m.eval()
    return {"transformer": transformer, "vae": tiny_flux.components()["vae"],
            "text_encoder": clip_l, "tokenizer": clip_tokenizer(),
            "text_encoder_2": clip_g, "tokenizer_2": clip_tokenizer("!"),
            "text_encoder_3": t5, "tokenizer_3": t5_tokenizer(),
            "text_encoder_4": llama, "tokenizer_4": llama3_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(size: int = 64) -> Any:
    """The pipeline, its picture area set to ``size`` squared (it rescales every request to its default
    area, 1024 squared, keeping the aspect; the tests' pictures are tiny)."""
    pipe = quiet_pipeline("HiDreamImagePipeline", components())
    pipe.default_sample_size = size // pipe.vae_scale_factor
    return pipe


def _clip_file(module: str) -> dict:
    from nodes.checkpoint.to_original import openai_clip_to_original

    state = components()[module].state_dict()
    out = openai_clip_to_original(state, "")
    out["text_projection.weight"] = state["text_projection.weight"]
    return out


def text_files() -> dict[str, dict]:
    """The four encoders as ComfyUI's files hold them, under the template's names (the "fp8" ones in
    float32 here): CLIPs in transformers' layout with their projections, T5's encoder, Llama's ``model.*``
    and ``lm_head``."""
    t5 = dict(components()["text_encoder_3"].state_dict())
    t5.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; files keep one
    llama = dict(components()["text_encoder_4"].state_dict())
    return dict(zip(TEXTS, (_clip_file("text_encoder"), _clip_file("text_encoder_2"), t5, llama)))


def make_models_folder(root: Any) -> Path:
    """diffusion_models/tiny-hidream.safetensors and -prefixed (``model.diffusion_model.``) and the templates'
    names, I1's three and E1's two (the one tiny transformer), text_encoders/ (the four template names),
    vae/ae.safetensors (the tiny FLUX VAE)."""
    root = Path(root)
    state = dict(components()["transformer"].state_dict())
    save_split_transformer(root / "diffusion_models", "tiny-hidream", state)
    for name in UNETS + E1_UNETS:
        tiny_flux._save(root / "diffusion_models" / name, state)
    for name, state in text_files().items():
        tiny_flux._save(root / "text_encoders" / name, state)
    tiny_flux._save(root / "vae" / VAE, tiny_flux.vae_state())
    return root
