"""A tiny random-weight AuraFlow for tests: the real architecture at toy sizes, in the files users have.

API:
    components()          -> diffusers parts keyed as AuraFlowPipeline names them (cached; do not mutate):
                             transformer (2 heads of 256, the width every release has; 1 joint and 1 single
                             block), vae (tiny SDXL's), text_encoder (UMT5EncoderModel with Pile-T5's 32128-row
                             vocabulary), tokenizer, scheduler (FlowMatchEuler, shift 1.73: the release's).
    pipeline()            -> AuraFlowPipeline over them.
    original_transformer() -> the transformer in fal's / ComfyUI's key layout.
    all_in_one(tokenizer) -> ComfyUI's CheckpointLoaderSimple layout (``aura_flow_0.3.safetensors``), the
                             tokenizer as ``text_encoders.spiece_model`` when ``tokenizer``.
    make_models_folder(root) -> ComfyUI's folders with all of them (see its docstring).

The tokenizer is tests/tiny_wan.py's SentencePiece model (pad 0, end 1, unk 2) and transformers' tokenizer over
the same pieces: Pile-T5's real one is the Llama SentencePiece model, which no test may fetch; Kiln reads either
by the ids the model itself names (nodes.checkpoint.spiece_file).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_models
import tiny_wan
from flow_family_files import quiet_pipeline, save_split_transformer, save_state

TEXT, HEADS, POSITIONS = 32, 2, 64
PILE_T5_VOCAB = 32128


def build(seed: int = 7) -> dict[str, Any]:
    import torch
    from diffusers import AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=PILE_T5_VOCAB, d_model=TEXT, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, tie_word_embeddings=False))
        tiny_wan._perturb(text_encoder, 0.05)
        transformer = AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=256, num_attention_heads=HEADS, joint_attention_dim=TEXT,
            caption_projection_dim=256 * HEADS, out_channels=4, pos_embed_max_size=POSITIONS)
        tiny_wan._perturb(transformer, 0.05)
    for m in (text_encoder, transformer):
        m.eval().requires_grad_(False)
    return {"tokenizer": tiny_wan.hf_tokenizer(), "text_encoder": text_encoder,
            "vae": tiny_models.components("sdxl")["vae"], "transformer": transformer,
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.73)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("AuraFlowPipeline", components())


def original_transformer() -> dict:
    from nodes.checkpoint.auraflow_keys import diffusers_to_original

    return diffusers_to_original(components()["transformer"].state_dict())


def spiece_tensor() -> Any:
    import torch

    return torch.frombuffer(bytearray(tiny_wan.spiece_model()), dtype=torch.uint8)


def text_state(tokenizer: bool = False) -> dict:
    """Pile-T5 in transformers' UMT5 names (a text-encoder file), with ``spiece_model`` when ``tokenizer``."""
    state = {k: v for k, v in components()["text_encoder"].state_dict().items()
             if k != "encoder.embed_tokens.weight"}  # tied to shared.weight, stored once (as Comfy-Org's files)
    return {**state, "spiece_model": spiece_tensor()} if tokenizer else state


def vae_state() -> dict:
    from nodes.checkpoint.to_original import vae_to_original

    vae = components()["vae"]
    state = vae_to_original(vae.state_dict(), dict(vae.config))
    return {k[len("first_stage_model."):]: v for k, v in state.items()}


def all_in_one(tokenizer: bool = True) -> dict:
    """ComfyUI's all-in-one layout: the transformer, Pile-T5 under ``text_encoders.pile_t5xl.transformer.``,
    the VAE under ``vae.``; the tokenizer as ``text_encoders.spiece_model`` when ``tokenizer``."""
    state = {"model.diffusion_model." + k: v for k, v in original_transformer().items()}
    state |= {"text_encoders.pile_t5xl.transformer." + k: v for k, v in text_state().items()}
    if tokenizer:
        state["text_encoders.spiece_model"] = spiece_tensor()
    return state | {"vae." + k: v for k, v in vae_state().items()}


def make_models_folder(root: Any) -> Path:
    """checkpoints/: tiny-auraflow.safetensors (the tokenizer in the file), tiny-auraflow-notok.safetensors (none
    anywhere), tiny-auraflow-beside.safetensors with tiny-auraflow-beside.tokenizer/ (transformers' files) and,
    in checkpoints/shared/, tiny-auraflow-shared.safetensors with pile_t5_tokenizer/tokenizer.model; the diffusers
    folder as checkpoints/tiny-auraflow-diffusers/ and diffusers/tiny-auraflow/.
    diffusion_models/tiny-auraflow{,-prefixed,-diffusers-keys,-aio} (-aio: the all-in-one file);
    text_encoders/tiny-pile-t5.safetensors (tokenizer in it) and tiny-pile-t5-notok.safetensors;
    vae/tiny-sdxl-vae.safetensors."""
    root = Path(root)
    ckpt = root / "checkpoints"
    save_state(ckpt / "tiny-auraflow.safetensors", all_in_one())
    save_state(ckpt / "tiny-auraflow-notok.safetensors", all_in_one(tokenizer=False))
    save_state(ckpt / "tiny-auraflow-beside.safetensors", all_in_one(tokenizer=False))
    components()["tokenizer"].save_pretrained(str(ckpt / "tiny-auraflow-beside.tokenizer"))
    save_state(ckpt / "shared" / "tiny-auraflow-shared.safetensors", all_in_one(tokenizer=False))
    (ckpt / "shared" / "pile_t5_tokenizer").mkdir(parents=True)
    (ckpt / "shared" / "pile_t5_tokenizer" / "tokenizer.model").write_bytes(tiny_wan.spiece_model())
    for folder in (ckpt / "tiny-auraflow-diffusers", root / "diffusers" / "tiny-auraflow"):
        pipeline().save_pretrained(str(folder), safe_serialization=True)
    save_state(root / "diffusion_models" / "tiny-auraflow-aio.safetensors", all_in_one())
    save_split_transformer(root / "diffusion_models", "tiny-auraflow", original_transformer(),
                           dict(components()["transformer"].state_dict()))
    save_state(root / "text_encoders" / "tiny-pile-t5.safetensors", text_state(tokenizer=True))
    save_state(root / "text_encoders" / "tiny-pile-t5-notok.safetensors", text_state())
    tiny_models.save_vae("sdxl", root / "vae" / "tiny-sdxl-vae.safetensors")
    return root
