"""What the Qwen text encoders' files share: where the decoder sits, its sizes, its keys.

Kiln reads several Qwen decoders from single files as text encoders: Qwen3 (Z-Image, FLUX.2 klein;
nodes.checkpoint.qwen3_text), Qwen3-VL (Krea 2, Qwen-Image 2.1, FIBO 2; nodes.checkpoint.krea2_load)
and Qwen2.5-VL (Qwen-Image; nodes.checkpoint.qwen_image_load). Their files differ in the prefix before
``layers.`` and in what sits beside the language model (an ``lm_head``, a vision tower under
``visual.``); their configs share every size the shapes show and differ only in what is each model's
own (rope settings, the config class, Qwen2.5-VL's head width, which its files do not show). So the
shapes are read here once (:func:`decoder_sizes`), and so are the language model's keys
(:func:`language_state`); each config builder adds what is its own.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nodes.checkpoint.load import CheckpointError
from nodes.checkpoint.qwen_vision import PREFIXES as VISION_PREFIXES

#: Qwen3's per-head query norm: its width is the head width (Qwen3 does not tie it to hidden / heads).
Q_NORM = "layers.0.self_attn.q_norm.weight"


def decoder_prefix(keys: Any, prefixes: tuple[str, ...], marker: str) -> str | None:
    """The first of ``prefixes`` under which ``keys`` hold a Qwen-style decoder: its ``marker`` (a
    layer-0 key that tells the model apart) and its ``embed_tokens.weight``; None when none does."""
    keys = set(keys)
    for prefix in prefixes:
        if prefix + marker in keys and prefix + "embed_tokens.weight" in keys:
            return prefix
    return None


def language_state(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The language model's tensors of a file, their ``prefix`` dropped: the output head (``lm_head.``) and
    a vision tower (``visual.``, ``model.visual.``) left out, since the encoders build neither with it.
    Only those tensors are read (a LazyState reads nothing else)."""
    skip = ("lm_head.", *VISION_PREFIXES)
    return {k[len(prefix):]: state[k] for k in state
            if k.startswith(prefix) and not k.startswith(skip) and not k[len(prefix):].startswith(skip)}


def decoder_from_file(state: Mapping[str, Any], prefix: str, what: str, dtype: Any, model_cls: Any,
                      config: Callable[[dict[str, tuple[int, ...]]], Any], label: str) -> Any:
    """``model_cls`` (a transformers decoder: Qwen3, Qwen3-VL's or Qwen2.5-VL's text model, Llama) built empty
    from ``config(the language model's shapes)`` and holding the file's language-model tensors under
    ``prefix``, linear weights kept as stored (scaled fp8 with its scales: nodes.checkpoint.scaled_fp8);
    ``label`` names it in errors."""
    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.load import _empty
    from nodes.checkpoint.tensors import shapes_of

    kept, scales = scaled_fp8.take(language_state(state, prefix), what)
    model = _empty(model_cls, config(shapes_of(kept)))
    return scaled_fp8.fill_as_stored(model, kept, scales, dtype, what, f"{label} ({what})")


def layer_count(shapes: Mapping[str, Any]) -> int:
    """How many decoder layers bare keys (``layers.N.``) hold."""
    return len({m.group(1) for k in shapes for m in [re.match(r"layers\.(\d+)\.", k)] if m})


@dataclass(frozen=True)
class DecoderSizes:
    """A Qwen decoder's sizes as its shapes show them."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    #: rows of layer 0's query and key projections: heads x head width
    q_rows: int
    kv_rows: int
    #: whether the attention projections have biases (Qwen2.5's do, Qwen3's do not)
    bias: bool
    #: the head width Qwen3's q_norm shows; None where the file has none (Qwen2.5-VL)
    q_norm: int | None

    def fields(self, head: int | None = None) -> dict[str, Any]:
        """The transformers config fields these sizes give (every Qwen text config names them alike), for
        heads ``head`` wide (None: q_norm's width)."""
        head = self.q_norm if head is None else head
        if not head:
            raise ValueError("a head width is needed: Qwen3's q_norm's, or the caller's rule")
        return {"vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.q_rows // head,
                "num_key_value_heads": self.kv_rows // head, "head_dim": head, "attention_bias": self.bias}


def decoder_sizes(shapes: Mapping[str, tuple[int, ...]], what: str, kind: str, q_norm: bool = True) -> DecoderSizes:
    """The sizes of a decoder from the shapes of its bare keys (``embed_tokens.weight``, ``layers.0...``).
    ``q_norm``: the file must hold Qwen3's per-head norm (Qwen3, Qwen3-VL). A key missing is a
    CheckpointError naming the file (``what``) and saying what it is not (``kind``: "Qwen3 text encoder")."""
    try:
        vocab, hidden = shapes["embed_tokens.weight"]
        q_rows = shapes["layers.0.self_attn.q_proj.weight"][0]
        kv_rows = shapes["layers.0.self_attn.k_proj.weight"][0]
        intermediate = shapes["layers.0.mlp.gate_proj.weight"][0]
        head = shapes[Q_NORM][0] if q_norm else None
    except KeyError as exc:
        raise CheckpointError(f"{what}: not a {kind} ({exc} is missing)") from None
    return DecoderSizes(vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layer_count(shapes),
                        q_rows=q_rows, kv_rows=kv_rows, bias="layers.0.self_attn.q_proj.bias" in shapes,
                        q_norm=head)
