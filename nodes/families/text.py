"""Text encoding for CLIP-conditioned families, driven by each family's encoder specs.

Prompts follow ComfyUI's rules (the syntax is parsed in :mod:`nodes.prompt_syntax`):

* **Windows.** CLIP sees 77 tokens at a time: a start token, 75 prompt tokens and
  an end token, padded. A longer prompt is split into several such windows, each
  encoded on its own; their hidden states are concatenated along the token axis
  (so 2 windows give 154 conditioning tokens) and the pooled output is the first
  window's. A weighted piece shorter than 8 tokens is not split across windows: if
  it does not fit, the window is closed (padded) and the piece starts the next one.
* **Weights.** A token of weight w becomes ``empty + (h - empty) * w``, where ``h``
  is its hidden state and ``empty`` the hidden state at the same position of the
  empty prompt (encoded in the same batch, in the same layer). Weight 1 tokens are
  left as they are, and a prompt without weights encodes no empty prompt at all.
* **Layers.** Which hidden layer, whether the final norm applies, and how several
  encoders combine come from the family's :class:`~nodes.families.base.TextEncoderSpec`
  list and CLIPSetLastLayer's value; this module names no family. When two
  encoders get prompts of different lengths (CLIPTextEncodeSDXL's text_g and
  text_l), the shorter is padded with empty-prompt windows so their tokens line up.

A prompt with no weights and at most 75 tokens is one window, one encoder call of
batch 1, exactly what diffusers' ``encode_prompt`` gives (the parity tests hold this).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from nodes.prompt_syntax import Parsed, parse

if TYPE_CHECKING:
    import torch

    from nodes.families.base import TextEncoderSpec

#: ComfyUI keeps a weighted piece shorter than this many tokens in one window.
MAX_WORD = 8
EMBEDDING = "embedding:"
_EMBEDDING_SPLIT = re.compile(r" embedding:|\nembedding:")


class LayerError(ValueError):
    """A CLIPSetLastLayer value the encoder cannot give."""


@dataclass
class Tokens:
    """One tokenizer's view of a prompt: 77-token windows with a weight per token."""

    windows: list[list[int]]
    weights: list[list[float]]
    #: Prompt tokens (without start, end and padding) over all windows.
    count: int
    empty: list[int]
    skipped: list[str] = field(default_factory=list)  # embedding names left out

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for row in self.weights for w in row)


def final_norm(te: Any) -> Any:
    """The encoder's final layer norm (transformers 5 flattened ``text_model``)."""
    inner = getattr(te, "text_model", te)
    return inner.final_layer_norm


def layer_range(spec: "TextEncoderSpec", depth: int) -> tuple[int, int]:
    """(deepest, shallowest) CLIPSetLastLayer values a built encoder of ``depth`` blocks can give."""
    return -(depth + spec.dropped), -(1 + spec.dropped)


def check_layer(spec: "TextEncoderSpec", depth: int, clip_layer: int) -> None:
    """Raise :class:`LayerError` if CLIPSetLastLayer's ``clip_layer`` is out of this encoder's reach."""
    low, high = layer_range(spec, depth)
    if low <= clip_layer <= high:
        return
    if clip_layer > high:
        raise LayerError(f"{spec.module} was built without its last {spec.dropped} block(s), as diffusers builds "
                         f"this model family, so it can stop at layers {high} to {low}, not {clip_layer}")
    raise LayerError(f"{spec.module} has {depth + spec.dropped} layers, so it can stop at layers -1 to {low} "
                     f"(not {clip_layer})")


def hidden_state(te: Any, ids: "torch.Tensor", spec: "TextEncoderSpec", layer: int) -> tuple["torch.Tensor", Any]:
    """(hidden states [n, tokens, width] of the built encoder's ``layer``, pooled output or None)."""
    depth = te.config.num_hidden_layers
    check_layer(spec, depth, layer - spec.dropped)
    use_last = layer == -1 and spec.norm_hidden  # the final norm's output is last_hidden_state itself
    out = te(ids.to(te.device), output_hidden_states=not use_last)
    if use_last:
        states = out.last_hidden_state
    else:
        states = out.hidden_states[layer]
        if spec.norm_hidden:
            states = final_norm(te)(states)
    pooled = out.text_embeds if spec.pooled else None
    return states, pooled


def prompt_pieces(parsed: Parsed) -> tuple[list[tuple[str, float]], list[str]]:
    """(text, weight) units ComfyUI tokenizes separately, and the embedding names left out.

    ComfyUI splits each segment before `` embedding:name`` references; Kiln has no
    textual-inversion embeddings, so a reference is left out (as ComfyUI does with
    an embedding it cannot find) and reported.
    """
    pieces, skipped = [], []
    for seg in parsed.segments:
        parts = _EMBEDDING_SPLIT.split(seg.text)
        parts = parts[:1] + [EMBEDDING + p for p in parts[1:]]
        for part in parts:
            if part.startswith(EMBEDDING):
                words = part[len(EMBEDDING):].strip("\n").split()
                if words:
                    skipped.append(words[0])
                part = " ".join(words[1:])
            if part:
                pieces.append((part, seg.weight))
    return pieces, skipped


def tokenize(tok: Any, parsed: Parsed) -> Tokens:
    """Windows of ``tok.model_max_length`` tokens for a parsed prompt (ComfyUI's packing)."""
    size = tok.model_max_length
    empty_ids = tok("").input_ids
    start, end, pad = empty_ids[0], empty_ids[-1], tok.pad_token_id
    pieces, skipped = prompt_pieces(parsed)
    windows: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = [(start, 1.0)]
    count = 0
    for text, weight in pieces:
        group = [(t, weight) for t in tok(text, verbose=False).input_ids[1:-1]]
        count += len(group)
        splittable = len(group) >= MAX_WORD
        while group:
            if len(current) + len(group) <= size - 1:
                current += group
                break
            room = size - 1 - len(current)
            if splittable:  # fill this window and carry the rest
                current += group[:room]
                group = group[room:]
                current.append((end, 1.0))
            else:  # close this window and start the piece in the next
                current += [(end, 1.0)] + [(pad, 1.0)] * room
            windows.append(current)
            current = [(start, 1.0)]
    current.append((end, 1.0))
    current += [(pad, 1.0)] * (size - len(current))
    windows.append(current)
    empty = [start, end] + [pad] * (size - 2)
    return Tokens([[t for t, _ in w] for w in windows], [[w for _, w in win] for win in windows], count, empty,
                  skipped)


def _encode_one(clip: Any, spec: "TextEncoderSpec", tokens: Tokens, layer: int) -> tuple["torch.Tensor", Any]:
    """[1, windows * 77, width] float32 CPU and the first window's pooled output (or None)."""
    import torch

    rows = tokens.windows + ([tokens.empty] if tokens.weighted else [])
    with clip.encoder(spec.module) as te:
        h, p = hidden_state(te, torch.tensor(rows), spec, layer)
    h = h.to("cpu", torch.float32)
    n = len(tokens.windows)
    if tokens.weighted:
        empty = h[n]
        w = torch.tensor(tokens.weights, dtype=torch.float32).unsqueeze(-1)  # [n, 77, 1]
        windows = h[:n]
        weighted = (windows - empty) * w + empty
        h = torch.where(w != 1.0, weighted, windows)  # weight-1 tokens keep their exact values
    else:
        h = h[:n]
    pooled = p[0:1].to("cpu", torch.float32) if p is not None else None
    return h.reshape(1, -1, h.shape[-1]), pooled


@dataclass
class Report:
    """What CLIPTextEncode tells the user about a prompt."""

    tokens: int = 0
    windows: int = 1
    problems: list[str] = field(default_factory=list)


def encode(clip: Any, text: str, report: Report | None = None, texts: dict[str, str] | None = None) -> list:
    """CONDITIONING [[embeds [1, tokens, dim] float32 CPU, {"pooled_output": tensor | None}]].

    ``texts`` gives some encoders their own prompt (tokenizer name -> text, as
    CLIPTextEncodeSDXL's text_g and text_l); encoders whose prompts need fewer
    windows get empty-prompt windows appended, as ComfyUI does.
    """
    import torch

    family = clip.family
    report = report if report is not None else Report()
    parsed_by_text: dict[str, Parsed] = {}
    tokens = []
    for spec in family.text_encoders:
        prompt = (texts or {}).get(spec.tokenizer, text)
        if prompt not in parsed_by_text:
            parsed_by_text[prompt] = parse(prompt)
            report.problems += [p for p in parsed_by_text[prompt].problems if p not in report.problems]
        tokens.append(tokenize(clip.tokenizers[spec.tokenizer], parsed_by_text[prompt]))
    windows = max(len(t.windows) for t in tokens)
    for t in tokens:
        t.windows += [list(t.empty)] * (windows - len(t.windows))
        t.weights += [[1.0] * len(t.empty)] * (windows - len(t.weights))
        report.tokens = max(report.tokens, t.count)
        for name in t.skipped:
            note = f"embedding:{name} left out: Kiln does not load textual-inversion embeddings"
            if note not in report.problems:
                report.problems.append(note)
    report.windows = windows
    states, pooled = [], None
    with torch.inference_mode():
        for spec, t in zip(family.text_encoders, tokens):
            h, p = _encode_one(clip, spec, t, family.encoder_layer(spec, clip.layer))
            states.append(h)
            if p is not None:
                pooled = p
    return [[family.combine_text(states), {"pooled_output": pooled}]]


def pooled_text(clip: Any, text: str) -> "torch.Tensor":
    """[1, width] float32 CPU: ``text``'s pooled output of the first encoder, unprojected (the final
    layer's state at the end token of the first window, whatever CLIPSetLastLayer says), as
    ComfyUI's ``return_pooled="unprojected"`` gives it (GLIGEN's phrases). Weights in the prompt
    syntax change hidden states only, never the pooled output."""
    import torch

    spec = clip.family.text_encoders[0]
    tokens = tokenize(clip.tokenizers[spec.tokenizer], parse(text))
    with torch.inference_mode(), clip.encoder(spec.module) as te:
        out = te(torch.tensor(tokens.windows[:1]).to(te.device), output_hidden_states=False)
    return out.pooler_output.to("cpu", torch.float32)


def without_logits(model: Any) -> dict[str, int]:
    """Keyword arguments that keep ``model`` from scoring every token when it is called for its hidden states.

    Kiln's loaders build the language model without its output head, from files and folders alike
    (nodes.checkpoint.qwen3_text, mistral_text, qwen_image_load, krea2_load, hidream_load), so they never
    load or run one. A handle over a model someone built in memory may hold the whole one (Qwen3ForCausalLM,
    Mistral3ForConditionalGeneration, a Qwen-VL), as the diffusers pipelines do: called as they call it, it
    also multiplies every token by the head, a width x ~150k matrix: about a tenth of a Qwen3-4B prompt's
    work and a tokens x vocabulary tensor that no image model reads. transformers' ``logits_to_keep`` scores
    the last token only. The hidden states are the same either way; a model without a head takes no such
    argument and gets none. Read from the class, so a hook that wraps the instance's ``forward``
    (offloading, compiling) does not hide it."""
    return {"logits_to_keep": 1} if _scores_tokens(type(model)) else {}


@lru_cache(maxsize=None)
def _scores_tokens(cls: type) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False
