"""A tiny random-weight Lumina Image 2.0 for tests: the real architecture at toy sizes.

API:
    components()          -> diffusers parts keyed as Lumina2Pipeline names them (cached; do not mutate):
                             transformer, vae, text_encoder (Gemma2Model), tokenizer, scheduler.
    pipeline()            -> Lumina2Pipeline over them.
    spiece_model()        -> the tiny SentencePiece model (bytes) both tokenizers are made of.
    make_models_folder()  -> ComfyUI's folders with the tiny model in the layouts users have.

The tokenizer is a SentencePiece BPE model trained here on a few lines (Gemma's special ids: pad 0, eos 1,
bos 2, unk 3; byte fallback; no dummy prefix), stored in the Gemma files as ComfyUI stores Gemma's
(``spiece_model``, uint8); diffusers' pipeline gets transformers' GemmaTokenizer over the same pieces, so
both sides tokenize identically (tests/test_lumina2.py checks it). The VAE is the tiny FLUX's.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_flux
from flow_family_files import quiet_pipeline, save_split_transformer, template

DIM, HEADS, KV_HEADS, CAP = 64, 4, 2, 32
NETAYUME = "image_netayume_lumina_t2i.json"
#: ComfyUI's Gemma 2 key for the tokenizer, in a split file and in a checkpoint
SPIECE = "spiece_model"


def _template_lines() -> list[str]:
    """The NetaYume template's own texts (its prompt, system prompts, negative), so they tokenize short."""
    doc = template(NETAYUME)
    texts = [w for s in doc["definitions"]["subgraphs"] for n in s["nodes"] if n["type"] == "PrimitiveStringMultiline"
             for w in n.get("widgets_values", []) if isinstance(w, str)]
    return [line for t in texts for line in t.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def spiece_model() -> bytes:
    import io

    import sentencepiece as spm

    lines = ["a red barn in a field", "blurry, low quality, extra fingers", "a cat on a sofa, ünïcode 漢字",
             "You are an assistant designed to generate superior images with the superior degree of image-text "
             "alignment based on textual prompts or user prompts. <Prompt Start> ",
             "You are an assistant designed to generate high-quality images with the highest degree of image-text "
             "alignment based on textual prompts. <Prompt Start> ", *_template_lines()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=out, vocab_size=1500, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity", split_by_whitespace=False,
        remove_extra_whitespaces=False, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    return out.getvalue()


def gemma_tokenizer() -> Any:
    """transformers' GemmaTokenizer with the SentencePiece model's pieces and merges (BOS added)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=spiece_model())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    merges = generate_merges(vocab, [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], special)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def build(seed: int = 1) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from nodes.checkpoint.lumina2_keys import rope_axes

    tokenizer = gemma_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, hidden_size=DIM, num_layers=2, num_refiner_layers=1,
            num_attention_heads=HEADS, num_kv_heads=KV_HEADS, multiple_of=256,
            axes_dim_rope=tuple(rope_axes(DIM // HEADS)),
            cap_feat_dim=CAP)
        tiny_flux._perturb(transformer, 0.05)
        transformer.eval()
        config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=CAP, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, use_cache=False)
        encoder = Gemma2Model(config).eval()
        tiny_flux._perturb(encoder, 0.05)
    return {"transformer": transformer, "vae": tiny_flux.components("dev")["vae"], "text_encoder": encoder,
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0,
                                                         use_dynamic_shifting=False)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("Lumina2Pipeline", components())


def original_transformer() -> dict:
    """The transformer in ComfyUI's layout, with the unused norm_final ComfyUI's files carry."""
    import torch

    from nodes.checkpoint.lumina2_keys import diffusers_to_original

    state = diffusers_to_original(components()["transformer"].state_dict())
    state["norm_final.weight"] = torch.ones(DIM)
    return state


def spiece_tensor() -> Any:
    import torch

    return torch.frombuffer(bytearray(spiece_model()), dtype=torch.uint8)


def gemma_file(tokenizer: bool = True) -> dict:
    """Gemma 2 as Comfy-Org's gemma_2_2b_fp16.safetensors holds it: ``model.*`` and the ``spiece_model`` tensor."""
    state = {"model." + k: v for k, v in components()["text_encoder"].state_dict().items()}
    return {**state, SPIECE: spiece_tensor()} if tokenizer else state


def all_in_one() -> dict:
    """A ComfyUI all-in-one checkpoint (NetaYume's layout): transformer, Gemma 2 with its tokenizer, VAE."""
    state = {"model.diffusion_model." + k: v for k, v in original_transformer().items()}
    state |= {"text_encoders.gemma2_2b.transformer." + k: v for k, v in gemma_file(tokenizer=False).items()}
    state["text_encoders." + SPIECE] = spiece_tensor()
    return state | {"vae." + k: v for k, v in tiny_flux.vae_state().items()}


def make_models_folder(root: Any) -> Path:
    """diffusion_models/tiny-lumina2{,-prefixed,-diffusers-keys}.safetensors, text_encoders/tiny-gemma_2_2b.safetensors
    (and tiny-gemma-no-tokenizer.safetensors), vae/tiny-flux-ae.safetensors, the all-in-one file as
    checkpoints/tiny-lumina2-aio.safetensors, NetaYumev35_pretrained_all_in_one.safetensors (the template's name)
    and diffusion_models/tiny-lumina2-aio.safetensors, and checkpoints/tiny-lumina2-diffusers/ and
    diffusers/tiny-lumina2/ (Lumina2Pipeline.save_pretrained)."""
    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-lumina2", original_transformer(),
                           dict(components()["transformer"].state_dict()))
    tiny_flux._save(root / "text_encoders" / "tiny-gemma_2_2b.safetensors", gemma_file())
    tiny_flux._save(root / "text_encoders" / "tiny-gemma-no-tokenizer.safetensors", gemma_file(tokenizer=False))
    tiny_flux._save(root / "vae" / "tiny-flux-ae.safetensors", tiny_flux.vae_state())
    for path in ("checkpoints/tiny-lumina2-aio.safetensors",
                 "checkpoints/NetaYumev35_pretrained_all_in_one.safetensors",
                 "diffusion_models/tiny-lumina2-aio.safetensors"):  # UNETLoader reads its diffusion model alone
        tiny_flux._save(root / path, all_in_one())
    for folder in (root / "checkpoints" / "tiny-lumina2-diffusers", root / "diffusers" / "tiny-lumina2"):
        pipeline().save_pretrained(str(folder), safe_serialization=True)
    return root
