"""ComfyUI's prompt weights on a T5 encoder (FLUX's text side).

T5 has no 77-token windows: the whole prompt is one sequence padded to a fixed
length. The weight rule is the one CLIP prompts follow (:mod:`nodes.families.text`):
a token of weight w becomes ``empty + (h - empty) * w``, with ``empty`` the hidden
state at the same position of the empty prompt (an end token then padding),
encoded in the same batch. As in ComfyUI, each word of a weighted piece is
tokenized on its own (sentencepiece gives every word its leading "▁" either way),
weight-1 tokens keep their exact values, and a prompt without weights never
comes here: it is encoded as diffusers' FluxPipeline encodes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodes.families.text import prompt_pieces
from nodes.prompt_syntax import Parsed

if TYPE_CHECKING:
    import torch


@dataclass
class T5Tokens:
    ids: list[int]
    weights: list[float]
    empty: list[int]
    #: prompt tokens before padding (without the end token), kept or not
    count: int


def tokenize(tok: Any, parsed: Parsed, length: int) -> T5Tokens:
    """The prompt's token ids with a weight each, cut to ``length`` with its end token and padded."""
    ids: list[int] = []
    weights: list[float] = []
    pieces, _ = prompt_pieces(parsed)
    for text, weight in pieces:
        for word in text.split(" "):
            if word:
                got = tok(word, add_special_tokens=False).input_ids
                ids += got
                weights += [weight] * len(got)
    count = len(ids)
    end, pad = tok.eos_token_id, tok.pad_token_id
    ids, weights = ids[:length - 1] + [end], weights[:length - 1] + [1.0]
    padding = length - len(ids)
    empty = [end] + [pad] * (length - 1)
    return T5Tokens(ids + [pad] * padding, weights + [1.0] * padding, empty, count)


def encode(t5: Any, tokens: T5Tokens, masked: bool = False) -> "torch.Tensor":
    """[1, length, width] hidden states with the weights applied (float32, CPU). ``masked``: T5 attends
    to each row's tokens up to its end token only (Chroma's encoding, diffusers' tokenizer mask)."""
    import torch

    rows = torch.tensor([tokens.ids, tokens.empty])
    mask = None
    if masked:
        kept = min(tokens.count + 1, len(tokens.ids))  # the prompt (as cut) and its end token
        mask = torch.zeros_like(rows)
        mask[0, :kept], mask[1, :1] = 1, 1
        mask = mask.to(t5.device)
    states = t5(rows.to(t5.device), attention_mask=mask, output_hidden_states=False)[0].to("cpu", torch.float32)
    h, empty = states[:1], states[1:]
    w = torch.tensor(tokens.weights, dtype=torch.float32).reshape(1, -1, 1)
    return torch.where(w != 1.0, (h - empty) * w + empty, h)
