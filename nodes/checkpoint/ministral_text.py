"""Ministral 3 (3B) as a text encoder: ERNIE-Image's, from Comfy-Org's ``ministral-3-3b.safetensors``.

ComfyUI loads it with CLIPLoader type ``flux2``, the type FLUX.2's Qwen3 (klein) and Mistral Small 3
([dev]) files also use; it tells them apart by the file (:func:`mistral_kind`). The file holds the
language model in transformers' causal-LM layout (``model.embed_tokens.weight``, ``model.layers.N.*``,
``model.norm.weight``; no Qwen3 ``q_norm``, no attention biases), bf16 or scaled fp8, and the release's
``tekken.json`` as a uint8 tensor ``tekken_model``: the tokenizer (nodes.checkpoint.tekken_tokenizer).

The model built is transformers' ``Ministral3Model`` (the language model of the pipeline's
``Mistral3Model``; ERNIE-Image reads a hidden state, never the logits, so a file's ``lm_head`` is left
unread). The sizes come from the shapes (nodes.checkpoint.qwen_decoder.decoder_sizes); the rest is
``Ministral3Config``'s own defaults, which are the Ministral 3 release's (RMSNorm eps 1e-5, rope theta
1e6 with its YaRN scaling over 16384 original positions): the pipeline's text encoder computes with
those, so Kiln does too (ComfyUI leaves the YaRN scaling out, which moves only the slowest rotary
frequencies). Heads are 128 wide where the widths allow it (the release: 32 query, 8 key/value heads
on a 3072 width); narrower models (the tests' tiny ones) are read as four query heads.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.llama_text import plain_decoder_prefix
from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.qwen_decoder import decoder_from_file, decoder_sizes

#: Where a Mistral file puts its language model: ComfyUI's / a causal LM's (``model.``), a whole Mistral3 save
#: (transformers 4 ``language_model.model.``, 5 ``model.language_model.``), a Mistral3Model's, a bare model's.
PREFIXES = ("model.", "language_model.model.", "model.language_model.", "language_model.", "")
#: Ministral 3 3B's width (ComfyUI tells it by this); Mistral Small 3 (FLUX.2 [dev]) is 5120 wide.
MINISTRAL3_WIDTH = 3072
MISTRAL_SMALL3_WIDTH = 5120
VOCAB = 131072
#: FLUX.2 [dev] reads its text encoder's layer 30: a Mistral decoder that deep is Mistral Small 3.
FLUX2_DEV_LAYERS = 30
HEAD = 128
KIND = "ministral3"


def _prefix(keys: Any) -> str | None:
    return plain_decoder_prefix(keys, PREFIXES)


def mistral_kind(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Which Mistral text encoder a file holds, for CLIPLoader type ``flux2``: ``"ministral3"``
    (ERNIE-Image's Ministral 3) or ``"mistral3"`` (FLUX.2 [dev]'s Mistral Small 3), else None.

    A Llama-style decoder (q_proj and the token embedding; no Qwen ``q_norm`` or attention biases) is a
    Mistral one when it carries Tekken (``tekken_model``) or has a release's size without it: Ministral 3's
    3072 width, Mistral Small 3's 5120 width and 131072 vocabulary (ComfyUI tells them by the width).
    At another width, the depth decides: FLUX.2 reads Mistral Small 3's hidden states after layers 10, 20
    and 30 (its files hold 40 layers, or 30 pruned), Ministral 3 3B has 26. The one rule that tells the two
    Mistrals apart, kept in this one function."""
    from nodes.checkpoint.tekken_tokenizer import TEKKEN_KEY

    prefix = _prefix(shapes)
    if prefix is None:
        return None
    vocab, width = shapes[prefix + "embed_tokens.weight"][:2]
    if TEKKEN_KEY not in shapes and width != MINISTRAL3_WIDTH and (vocab, width) != (VOCAB, MISTRAL_SMALL3_WIDTH):
        return None
    if width in (MINISTRAL3_WIDTH, MISTRAL_SMALL3_WIDTH):
        return KIND if width == MINISTRAL3_WIDTH else "mistral3"
    layers = sum(1 for k in shapes if k.startswith(prefix + "layers.") and k.endswith(".self_attn.q_proj.weight"))
    return "mistral3" if layers >= FLUX2_DEV_LAYERS else KIND


def ministral3_config(shapes: Mapping[str, tuple[int, ...]], what: str) -> Any:
    """transformers' ``Ministral3Config`` from bare (prefix-free) decoder shapes; the rest the release's."""
    from transformers import Ministral3Config

    sizes = decoder_sizes(shapes, what, "Ministral 3 text encoder", q_norm=False)
    head = HEAD if sizes.q_rows % HEAD == 0 and sizes.kv_rows % HEAD == 0 else sizes.q_rows // 4
    return Ministral3Config(**sizes.fields(head), tie_word_embeddings=False, use_cache=False)


def build_ministral3(state: Mapping[str, Any], what: str, dtype: Any, config: Any = None) -> Any:
    """transformers' ``Ministral3Model`` holding ``state``'s language model (``lm_head``, ``tekken_model`` and a
    vision tower left out), linear weights kept as stored (scaled fp8 with its scales). ``config``: a folder's
    own ``Ministral3Config`` (else :func:`ministral3_config` from the shapes). CheckpointError names ``what``."""
    from transformers import Ministral3Model

    from nodes.checkpoint.tekken_tokenizer import TEKKEN_KEY

    prefix = _prefix(state.keys())
    if prefix is None:
        raise CheckpointError(f"{what} holds no Ministral 3 text encoder; expected model.embed_tokens.weight and "
                              "model.layers.N.self_attn.q_proj.weight (ministral-3-3b.safetensors' layout)")
    decoder = {k: state[k] for k in state if k != TEKKEN_KEY and k.startswith(prefix)}
    return decoder_from_file(decoder, prefix, what, dtype, Ministral3Model,
                             lambda shapes: config or ministral3_config(shapes, what), "Ministral 3 text encoder")
