"""Gemma 2 as a text encoder (Lumina Image 2.0's Gemma 2 2B) and its tokenizer, from the files people have.

ComfyUI users keep it as ``models/text_encoders/gemma_2_2b_fp16.safetensors`` in transformers' causal-LM
layout (``model.embed_tokens.weight``, ``model.layers.N.*`` with Gemma 2's four block norms, among them
``post_feedforward_layernorm``, ``model.norm.weight``), or inside an all-in-one checkpoint under
``text_encoders.gemma2_2b.transformer.``. Comfy-Org's files carry Gemma's SentencePiece model beside the
weights as a uint8 tensor, ``spiece_model`` (``text_encoders.spiece_model`` in a checkpoint: ComfyUI saves
its tokenizer's state there), and ComfyUI tokenizes with it: BOS first, no EOS, no padding. Kiln reads the
tokenizer from that tensor (:func:`spiece_tokenizer`), so nothing is fetched.

The model is transformers' ``Gemma2Model`` (what diffusers' Lumina2Pipeline runs), its sizes from the
shapes (nodes.checkpoint.qwen_decoder.decoder_sizes) and the rest Gemma 2's own: head width 256 where the
widths allow it (the tests' tiny models: two key/value heads), RMSNorm eps 1e-6, rope theta 10000, GELU
(tanh), the query scaled by the head width, attention logits soft-capped at 50 as transformers does.
(ComfyUI's own Gemma 2 skips the soft cap; Kiln follows transformers and diffusers here.)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.qwen_decoder import Q_NORM, decoder_from_file, decoder_prefix, decoder_sizes
from nodes.checkpoint.spiece_file import SPIECE_KEY, SpieceTokenizer, spiece_bytes
from nodes.checkpoint.tokenizer_memo import from_folder

PREFIXES = ("model.", "")
#: Gemma 2's (and 3's) norm after the MLP: Llama and Qwen have none
MARKER = "layers.0.post_feedforward_layernorm.weight"
RMS_EPS = 1e-6
ROPE_THETA = 10000.0
MAX_POSITIONS = 8192
HEADS = (256, 128)
SOFTCAP = 50.0
FINAL_SOFTCAP = 30.0
SLIDING_WINDOW = 4096


def text_prefix(keys: Any) -> str | None:
    """The prefix under which ``keys`` hold a Gemma 2 decoder (Gemma 3, with Qwen3-style q_norm, is not one)."""
    keys = set(keys)
    prefix = decoder_prefix(keys, PREFIXES, MARKER)
    return None if prefix is None or prefix + Q_NORM in keys else prefix


def is_gemma2(keys: Any) -> bool:
    return text_prefix(keys) is not None


def gemma2_config(shapes: Mapping[str, tuple[int, ...]], what: str) -> Any:
    """transformers' ``Gemma2Config`` from bare (prefix-free) Gemma2Model key shapes; the rest Gemma 2's."""
    from transformers import Gemma2Config

    sizes = decoder_sizes(shapes, what, "Gemma 2 text encoder", q_norm=False)
    head = next((h for h in HEADS if sizes.q_rows % h == 0 and sizes.kv_rows % h == 0), sizes.kv_rows // 2)
    return Gemma2Config(**sizes.fields(head), hidden_activation="gelu_pytorch_tanh", rms_norm_eps=RMS_EPS,
                        max_position_embeddings=MAX_POSITIONS, query_pre_attn_scalar=head,
                        attn_logit_softcapping=SOFTCAP, final_logit_softcapping=FINAL_SOFTCAP,
                        sliding_window=SLIDING_WINDOW,
                        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, use_cache=False)


def build_gemma2(state: Mapping[str, Any], what: str, dtype: Any, prefix: str | None = None,
                 config: Any = None) -> Any:
    """transformers' ``Gemma2Model`` holding a file's Gemma 2 (``prefix``: where its ``layers.`` sit, found
    when None), linear weights kept as stored (scaled fp8 with its scales); ``config``: a folder's
    Gemma2Config, else the shapes'. Raises CheckpointError naming ``what`` for a file with no Gemma 2."""
    from transformers import Gemma2Model

    prefix = text_prefix(state.keys()) if prefix is None else prefix
    if prefix is None:
        raise CheckpointError(f"{what} holds no Gemma 2 text encoder; expected model.embed_tokens.weight and "
                              f"model.{MARKER} (gemma_2_2b*.safetensors' layout)")
    return decoder_from_file(state, prefix, what, dtype, Gemma2Model,
                             lambda shapes: config or gemma2_config(shapes, what),
                             "Gemma 2 text encoder")


def spiece_tokenizer(state: Mapping[str, Any], what: str, prefix: str = "", instead: str = "") -> SpieceTokenizer:
    """The tokenizer a file carries as its ``spiece_model`` tensor (under ``prefix``, or at any depth below
    it: ``text_encoders.spiece_model`` in a checkpoint). A file without it, or with one sentencepiece cannot
    read, is a CheckpointError naming ``what``, what is missing and ``instead`` (what the user may do)."""
    data = spiece_bytes(state, prefix)
    if data is None:
        raise CheckpointError(f"{what} holds Gemma 2 but not its tokenizer: no {prefix}{SPIECE_KEY} tensor (Gemma's "
                              "SentencePiece model, which Comfy-Org's gemma_2_2b*.safetensors and Lumina 2 "
                              "checkpoints carry; Kiln reads the tokenizer from the file only)" + instead)
    return SpieceTokenizer(data, what, bos=True)


def folder_gemma_tokenizer(folder: Any) -> Any:
    """A diffusers folder's ``tokenizer/`` (transformers' Gemma tokenizer, as Lumina2Pipeline saves it)."""
    from transformers import AutoTokenizer

    return from_folder(AutoTokenizer, folder, "tokenizer")
