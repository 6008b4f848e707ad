"""FLUX.2 [dev]'s text encoder, Mistral Small 3 (24B), from the files people have.

Comfy-Org ships it as ``models/text_encoders/mistral_3_small_flux2_*.safetensors``: the language model
of ``Mistral3ForConditionalGeneration`` in transformers' causal-LM layout (``model.embed_tokens.weight``,
``model.layers.N.*``, ``model.norm.weight``), bf16 or (scaled) fp8, with the release's ``tekken.json``
carried as the uint8 tensor ``tekken_model`` (nodes.checkpoint.tekken_tokenizer). A pruned file keeps
the first 30 of the 40 layers: FLUX.2 reads the hidden states after layers 10, 20 and 30 only, and
ComfyUI builds that file without a final norm. A whole ``Mistral3ForConditionalGeneration`` save
(``model.language_model.*`` or ``language_model.model.*`` beside ``vision_tower.*`` and
``multi_modal_projector.*``) loads too: only the language model is read, the vision tower and its
projector are left unread (FLUX.2 never shows the encoder a picture).

Its keys are Llama's (no Qwen3 ``q_norm``, no attention biases); what marks it as Mistral is the
tokenizer it carries, or Mistral Small 3's sizes (5120 wide, vocabulary 131072) in a file without one
(the rule is nodes.checkpoint.ministral_text.mistral_kind).
The model built is transformers' ``MistralModel``; the numbers the shapes cannot show are Mistral
Small 3's (RMSNorm eps 1e-5, rope theta 1e9, head width 128: narrower test models are read as four
query heads). Its final norm is never applied: FLUX.2 reads no output after it, and a 30-layer file's
last hidden state must come out un-normed as ComfyUI's (transformers would norm the last one).

API: :func:`build_mistral` (the model). Which Mistral a file holds is nodes.checkpoint.ministral_text's
``mistral_kind``; the tokenizer is nodes.checkpoint.tekken_tokenizer's ``tokenizer_in_file``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.checkpoint import ministral_text
from nodes.checkpoint.llama_text import plain_decoder_prefix
from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.qwen_decoder import decoder_sizes
from nodes.checkpoint.tekken_tokenizer import TEKKEN_KEY

#: Where a file may put the language model (Comfy-Org's / a causal LM's, a whole Mistral3 save's, a bare
#: model's): the one list nodes.checkpoint.ministral_text.mistral_kind classifies the file by.
PREFIXES = ministral_text.PREFIXES
#: Beside the language model in a Mistral3ForConditionalGeneration file; never read.
UNREAD = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
          "lm_head.", "language_model.lm_head.", TEKKEN_KEY)
RMS_EPS = 1e-5
ROPE_THETA = 1_000_000_000.0
MAX_POSITIONS = 131072
HEAD = 128


def _prefix(keys: Any) -> str | None:
    return plain_decoder_prefix(keys, PREFIXES)


def mistral_config(shapes: Mapping[str, tuple[int, ...]], what: str) -> Any:
    """transformers' ``MistralConfig`` from bare (prefix-free) MistralModel key shapes; the rest Mistral
    Small 3's (its text config)."""
    from transformers import MistralConfig

    sizes = decoder_sizes(shapes, what, "Mistral text encoder", q_norm=False)
    head = HEAD if sizes.q_rows % HEAD == 0 and sizes.kv_rows % HEAD == 0 else sizes.q_rows // 4
    fields = {k: v for k, v in sizes.fields(head).items() if k != "attention_bias"}
    return MistralConfig(**fields, hidden_act="silu", rms_norm_eps=RMS_EPS, max_position_embeddings=MAX_POSITIONS,
                         rope_theta=ROPE_THETA, sliding_window=None, tie_word_embeddings=False, use_cache=False)


def build_mistral(state: Mapping[str, Any], what: str, dtype: Any, text_config: dict | None = None) -> Any:
    """transformers' ``MistralModel`` holding the file's language model (linear weights as stored, scaled
    fp8 with its scales), its final norm replaced by identity (see the module docstring). ``text_config``:
    a folder's (Mistral3's ``text_config``), else the shapes' and Mistral Small 3's. Raises
    CheckpointError naming ``what``."""
    import torch
    from transformers import MistralModel

    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.load import _empty
    from nodes.checkpoint.tensors import shapes_of

    prefix = _prefix(state.keys())
    if prefix is None:
        raise CheckpointError(f"{what} holds no Mistral text encoder; expected model.embed_tokens.weight and "
                              "model.layers.N.self_attn.q_proj.weight (Comfy-Org's mistral_3_small_flux2 layout)")
    language = {k[len(prefix):]: state[k] for k in state
                if k.startswith(prefix) and not k.startswith(UNREAD) and not k[len(prefix):].startswith(UNREAD)}
    language.pop("norm.weight", None)  # the final norm is not applied (a pruned file has none)
    kept, scales = scaled_fp8.take(language, what)
    config = mistral_config(shapes_of(kept), what)
    if text_config is not None:
        from transformers import MistralConfig

        config = MistralConfig(**{**{k: v for k, v in text_config.items() if k not in ("model_type", "architectures")},
                                  "use_cache": False})
    model = _empty(MistralModel, config)
    model.norm = torch.nn.Identity()
    return scaled_fp8.fill_as_stored(model, kept, scales, dtype, what, f"Mistral text encoder ({what})")
