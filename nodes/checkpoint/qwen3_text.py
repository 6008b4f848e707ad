"""A Qwen3 text encoder (Z-Image's Qwen3-4B, FLUX.2 klein's Qwen3) from the files people have.

ComfyUI users keep it as one file, ``models/text_encoders/qwen_3_4b*.safetensors``, in
transformers' causal-LM layout: ``model.embed_tokens.weight``, ``model.layers.N.*`` (attention
with per-head ``q_norm`` / ``k_norm``, a SiLU-gated MLP), ``model.norm.weight`` and, in some
files, ``lm_head.weight``. They come as bf16, plain ``float8_e4m3fn`` and ComfyUI's scaled fp8
(nodes.checkpoint.scaled_fp8). A diffusers folder's ``text_encoder/`` holds the same keys.

The image models read a hidden layer, never the logits, so the model built here is transformers'
``Qwen3Model`` (no ``lm_head``: a file's head is dropped unread). Its config comes from the tensor
shapes; ``head_dim`` from ``q_norm`` (Qwen3 does not tie it to hidden_size / heads). The numbers the
shapes cannot give are those every Qwen3 release uses (RMSNorm eps 1e-6, rope theta 1e6); a folder's
own ``config.json`` may be passed instead.

API: :func:`is_qwen3` (a file's keys), :func:`build_qwen3` (the model), :func:`hidden_states`
(one layer's output for token ids and a mask).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.qwen_decoder import Q_NORM, VISION_PREFIXES, decoder_from_file, decoder_prefix, decoder_sizes

#: key prefixes a Qwen3 file may put before ``layers.`` (causal-LM file, bare Qwen3Model)
PREFIXES = ("model.", "")
MARKER = Q_NORM
#: what every Qwen3 release sets and the shapes do not show
RMS_EPS = 1e-6
ROPE_THETA = 1_000_000.0
MAX_POSITIONS = 40960


def _prefix(keys: Any) -> str | None:
    """The prefix under which ``keys`` hold a Qwen3 decoder (q_norm marks Qwen3 among Qwen/Llama files)."""
    return decoder_prefix(keys, PREFIXES, MARKER)


def is_qwen3(keys: Any) -> bool:
    """Whether a file's keys hold a Qwen3 text model (``model.layers.0.self_attn.q_norm.weight`` and the
    token embedding), in the causal-LM or bare layout."""
    return _prefix(keys) is not None


def qwen3_config(shapes: Mapping[str, tuple[int, ...]], what: str) -> Any:
    """A transformers ``Qwen3Config`` from the shapes of bare (prefix-free) Qwen3Model keys (the sizes:
    nodes.checkpoint.qwen_decoder.decoder_sizes); the rest is every Qwen3 release's."""
    from transformers import Qwen3Config

    sizes = decoder_sizes(shapes, what, "Qwen3 text encoder")
    return Qwen3Config(**sizes.fields(), hidden_act="silu", rms_norm_eps=RMS_EPS,
                       max_position_embeddings=MAX_POSITIONS,
                       rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                       tie_word_embeddings=False, use_cache=False)


def build_qwen3(state: Mapping[str, Any], what: str, dtype: Any, config: Any = None) -> Any:
    """transformers' ``Qwen3Model`` holding ``state`` (a Qwen3 file's tensors, prefix ``model.`` or none,
    ``lm_head`` ignored). Linear weights stay as stored (fp8 kept fp8, bf16 kept bf16 when computing in
    fp32: nodes.runtime.fp8); ComfyUI scaled fp8 files get their scales. ``config``: a folder's
    Qwen3Config, else the one the shapes give. Raises CheckpointError naming ``what`` for a file that is
    not a Qwen3 (a Qwen2.5-VL, a T5, a diffusion model) or whose weights do not fit."""
    from transformers import Qwen3Model

    prefix = _prefix(state.keys())
    if prefix is None:
        raise CheckpointError(f"{what} holds no Qwen3 text encoder ({_what_instead(state.keys())}); "
                              "expected model.embed_tokens.weight and model.layers.N.self_attn.q_norm.weight")
    # Qwen3's keys need no conversion: scales keep their names
    return decoder_from_file(state, prefix, what, dtype, Qwen3Model,
                             lambda shapes: config if config is not None else qwen3_config(shapes, what),
                             "Qwen3 text encoder")


def _what_instead(keys: Any) -> str:
    """What a file that is not a Qwen3 holds, in the user's terms."""
    keys = list(keys)
    if any(k.endswith("layers.0.self_attn.q_proj.weight") for k in keys):
        if any(k.startswith(VISION_PREFIXES) for k in keys):
            return "it holds a Qwen2.5-VL, Qwen-Image's encoder"
        return "it holds a Qwen2 / Llama-style decoder without Qwen3's q_norm"
    if any("SelfAttention.q.weight" in k for k in keys):
        return "it holds a T5 encoder"
    if any("embeddings.token_embedding" in k for k in keys):
        return "it holds a CLIP text encoder"
    return f"keys such as {sorted(keys)[:3]}"


def hidden_states(model: Any, ids: Any, mask: Any, layer: int) -> Any:
    """Hidden states of ``layer`` (an index into transformers' ``hidden_states`` tuple: 0 the embeddings,
    -1 the final norm's output, -2 the second-to-last layer's output as Z-Image reads) for token ``ids``
    [batch, tokens] with attention ``mask`` (1 keep, 0 padding; None: all kept), on the model's device."""
    device = model.embed_tokens.weight.device
    ids = ids.to(device)
    mask = None if mask is None else mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer]
