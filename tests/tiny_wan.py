"""A tiny random-weight ChronoEdit (Wan 2.1 image-to-video) for tests, in the files users have.

API:
    spiece_model()   -> a tiny SentencePiece model's bytes (trained here on a few lines; pad 0, end 1, unk 2).
    hf_tokenizer()   -> transformers' T5 tokenizer built from that model's pieces and scores (the pipeline's;
                        Kiln reads the same bytes with sentencepiece itself).
    components()     -> diffusers parts keyed as ChronoEditPipeline names them (cached; do not mutate).
    pipeline()       -> ChronoEditPipeline over them.
    comfy_text_state() -> UMT5 as Comfy-Org's umt5_xxl file holds it (the tokenizer as ``spiece_model``).
"""
from __future__ import annotations

import functools
import io
from typing import Any

#: UMT5: width 32, 2 blocks (each with its relative attention bias).
TEXT = 32
LINES = ("a photo of a cat on a mat", "the quick brown fox jumps over the lazy dog",
         "make the sky blue and add a red balloon", "an old man with a hat, smiling",
         "turn the cup into glass and keep the table")


def _perturb(module: Any, scale: float) -> None:
    """Random weights everywhere (zero-initialised norms and tables would hide inputs)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


@functools.lru_cache(maxsize=None)
def spiece_model() -> bytes:
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES * 20), model_writer=out, vocab_size=40, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, normalization_rule_name="identity", minloglevel=2)
    return out.getvalue()


def hf_tokenizer() -> Any:
    """transformers' T5TokenizerFast over a ``tokenizers`` Unigram with the model's pieces and scores
    (SentencePiece's whitespace rule: runs collapsed, ends stripped, a "▁" before each word)."""
    import sentencepiece
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece_model())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id()))
    tk.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", sp.eos_id())])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def build(seed: int = 5) -> dict[str, Any]:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=40, d_model=TEXT, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, tie_word_embeddings=False))
        _perturb(text_encoder, 0.05)
    for m in (text_encoder,):
        m.eval().requires_grad_(False)
    return {"text_encoder": text_encoder, "tokenizer": hf_tokenizer()}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def comfy_text_state() -> dict:
    """Comfy-Org's umt5_xxl layout: transformers' UMT5 encoder names, ``spiece_model`` beside them."""
    import torch

    state = {k: v.contiguous() for k, v in components()["text_encoder"].state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    state["spiece_model"] = torch.frombuffer(bytearray(spiece_model()), dtype=torch.uint8)
    return state
