"""A Llama 3.1 text encoder (HiDream-I1's Llama 3.1 8B Instruct) from the files people have.

ComfyUI users keep it as ``models/text_encoders/llama_3.1_8b_instruct*.safetensors`` in transformers'
causal-LM layout (``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``, maybe
``lm_head.weight``), as bf16 or ComfyUI's scaled fp8 (nodes.checkpoint.scaled_fp8). Among the decoders
Kiln reads it is the one with neither Qwen3's per-head ``q_norm`` nor Qwen2.5's attention biases.

HiDream reads every layer's hidden states, never the logits, so the model built here is transformers'
``LlamaModel`` (a file's ``lm_head`` is dropped unread). The sizes come from the shapes
(nodes.checkpoint.qwen_decoder.decoder_sizes); what they cannot show is Llama 3.1's: head width 128
(taken whenever the widths allow it; narrower models, the tests' tiny ones, are read as four query
heads), RMSNorm eps 1e-5, rope theta 500000 with Llama 3.1's "llama3" frequency scaling.

API: :func:`is_llama` (a file's keys), :func:`build_llama` (the model).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.qwen_decoder import Q_NORM, decoder_from_file, decoder_prefix, decoder_sizes

PREFIXES = ("model.", "")
MARKER = "layers.0.self_attn.q_proj.weight"
#: Llama 3.1's settings the shapes do not show (its config.json).
RMS_EPS = 1e-5
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MAX_POSITIONS = 131072
HEAD = 128


def plain_decoder_prefix(keys: Any, prefixes: tuple[str, ...] = PREFIXES) -> str | None:
    """The first of ``prefixes`` under which ``keys`` hold a Llama-style decoder (q_proj and the token
    embedding) without Qwen3's q_norm or Qwen2.5's attention biases: Llama's, and Mistral's
    (nodes.checkpoint.ministral_text); None when none does."""
    keys = set(keys)
    prefix = decoder_prefix(keys, prefixes, MARKER)
    if prefix is None or prefix + Q_NORM in keys or prefix + "layers.0.self_attn.k_proj.bias" in keys:
        return None  # Qwen3 (q_norm) or Qwen2 / 2.5 (attention biases)
    return prefix


def is_llama(keys: Any) -> bool:
    """Whether a file's keys hold a Llama-style decoder: q_proj and the token embedding, without Qwen3's
    q_norm or Qwen2.5's attention biases (and no vision tower: a Qwen-VL file is not one)."""
    keys = set(keys)
    return plain_decoder_prefix(keys) is not None and not any(k.startswith(("visual.", "model.visual.")) for k in keys)


def llama_config(shapes: Mapping[str, tuple[int, ...]], what: str) -> Any:
    """transformers' ``LlamaConfig`` from bare (prefix-free) LlamaModel key shapes; the rest Llama 3.1's."""
    from transformers import LlamaConfig

    sizes = decoder_sizes(shapes, what, "Llama text encoder", q_norm=False)
    head = HEAD if sizes.hidden % HEAD == 0 and sizes.kv_rows % HEAD == 0 else sizes.hidden // 4
    fields = sizes.fields(head)
    return LlamaConfig(**fields, hidden_act="silu", rms_norm_eps=RMS_EPS, max_position_embeddings=MAX_POSITIONS,
                       rope_parameters=dict(ROPE), mlp_bias=False, tie_word_embeddings=False, use_cache=False)


def build_llama(state: Mapping[str, Any], what: str, dtype: Any, config: Any = None) -> Any:
    """transformers' ``LlamaModel`` holding ``state`` (prefix ``model.`` or none; ``lm_head`` ignored), linear
    weights kept as stored (scaled fp8 with its scales). ``config``: a LlamaConfig to build it by (a diffusers
    folder's ``text_encoder_4/config.json``); None: :func:`llama_config` from the shapes. Raises
    CheckpointError naming ``what``."""
    from transformers import LlamaModel

    prefix = plain_decoder_prefix(state.keys())
    if prefix is None:
        raise CheckpointError(f"{what} holds no Llama text encoder; expected model.embed_tokens.weight and "
                              "model.layers.N.self_attn.q_proj.weight (Llama 3.1 8B Instruct's layout)")
    return decoder_from_file(state, prefix, what, dtype, LlamaModel,
                             lambda shapes: llama_config(shapes, what) if config is None else config,
                             "Llama text encoder")


def all_hidden_states(model: Any, ids: Any, mask: Any) -> Any:
    """Every layer's output [layers, batch, tokens, width] for token ``ids`` with attention ``mask``, as
    HiDreamImagePipeline stacks them (transformers' ``hidden_states[1:]``: the last is after the final norm)."""
    import torch

    device = model.embed_tokens.weight.device
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False)
    return torch.stack(out.hidden_states[1:], dim=0)
