"""Next-token decoding for TextGenerate: greedy, or seeded sampling with ComfyUI's filters.

The decoder is transformers' own (Qwen3Model, Qwen2.5-VL's language model), run with its key/value
cache: one pass over the prompt, then one token per pass. The token is chosen here rather than by
transformers' ``generate`` because sampling must be reproducible for a seed on any device without
touching the process-wide random state (``generate`` draws from it): the draw uses a CPU
``torch.Generator`` seeded from the node's seed, as Kiln draws sampler noise. Greedy decoding
(sampling off) is the same argmax ``generate(do_sample=False)`` takes, token for token.

Sampling follows the order ComfyUI's TextGenerate applies (comfy/text_encoders/llama.py):
repetition penalty (a seen token's score divided by it when positive, multiplied when negative)
and presence penalty (subtracted from a seen token's score), both over the prompt and the tokens
generated so far; then temperature; top-k (tokens tied with the k-th best kept too); min-p (tokens
below ``min_p`` times the best one's probability dropped); top-p (the most likely tokens whose summed
probability stays within ``top_p``, the likeliest always kept: the token that crosses ``top_p`` is
dropped, where transformers' TopPLogitsWarper keeps it); then one draw. ComfyUI draws with its own
generator on the compute device, so the text it samples for a seed differs from Kiln's; each is
reproducible for its seed.

Why not transformers' logits processors: they have no presence penalty, their top-p keeps the
crossing token (another distribution than ComfyUI's for the same settings), and they filter the whole
vocabulary at every step, where cutting to the top-k first leaves min-p and top-p a few dozen scores
to sort instead of Qwen's 151k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Sampling:
    """TextGenerate's "on" settings (ComfyUI's names and meanings)."""

    temperature: float = 0.7
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.05
    presence_penalty: float = 0.0
    seed: int = 0


def penalised(scores: Any, seen: Any, repetition: float, presence: float) -> Any:
    """``scores`` [vocab] with the seen tokens' (bool mask ``seen``) scores penalised."""
    import torch

    changed = scores
    if repetition != 1.0:
        changed = torch.where(changed < 0, changed * repetition, changed / repetition)
    if presence:
        changed = changed - presence
    return torch.where(seen, changed, scores)


def choose(scores: Any, settings: Sampling, seen: Any, generator: Any) -> int:
    """One token from float32 ``scores`` [vocab] (see the module docstring for the order)."""
    import torch

    scores = penalised(scores, seen, settings.repetition_penalty, settings.presence_penalty)
    scores = scores / settings.temperature
    index = None
    if settings.top_k > 0:
        kth = torch.topk(scores, min(settings.top_k, scores.shape[-1])).values[-1]
        index = torch.nonzero(scores >= kth).squeeze(-1)
        scores = scores[index]
    if settings.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < settings.min_p * probs.max(), float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        beyond = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1) > settings.top_p
        beyond[0] = False  # the most likely token always stays
        scores = scores.masked_fill(torch.zeros_like(beyond).scatter(0, order, beyond), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to("cpu", torch.float32)
    drawn = int(torch.multinomial(probs, 1, generator=generator))
    return int(index[drawn]) if index is not None else drawn


def head_scores(hidden: Any, head: Any, tied: Any) -> Any:
    """float32 next-token scores [vocab] of one hidden state [width]: the file's ``head``, else the
    ``tied`` weight (the token embedding's, in the hidden state's dtype)."""
    import torch

    if head is not None:
        return head(hidden.to(head.weight.dtype)).float()
    return torch.nn.functional.linear(hidden, tied).float()


def generate(decoder: Any, head: Any, prompt: list[int], max_length: int, stops: frozenset[int],
             settings: Sampling | None, progress: Callable[[int, int], None] | None = None,
             prefill: dict[str, Any] | None = None, position: Callable[[int], Any] | None = None) -> list[int]:
    """Up to ``max_length`` new token ids after ``prompt`` (the stop token that ended it included, as
    ComfyUI counts it); ``settings`` None is greedy. ``progress(step, max_length)`` is called after each
    token (the node's interruption point). ``prefill``: extra arguments of the first pass (a prompt's
    pictures, nodes.text_vision); ``position(index)``: the position ids of the token at ``index``
    where the decoder cannot count them itself."""
    import torch

    embedding = decoder.get_input_embeddings()
    device = embedding.weight.device
    generator = None
    seen = None
    if settings is not None:
        generator = torch.Generator().manual_seed(settings.seed % 2**64)
        vocab = (head if head is not None else embedding).weight.shape[0]
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt, device=device)] = True
    out: list[int] = []
    ids = torch.tensor([prompt], device=device)
    cache = tied = None
    with torch.inference_mode():
        for step in range(max_length):
            if step == 0:
                extra = dict(prefill or {})
            else:
                extra = {} if position is None else {"position_ids": position(len(prompt) + step - 1)}
            result = decoder(input_ids=ids, past_key_values=cache, use_cache=True, **extra)
            cache = result.past_key_values
            hidden = result.last_hidden_state[0, -1]
            if head is None and tied is None:  # cast once (an fp8 embedding), not per token
                tied = embedding.weight.to(hidden.dtype)
            scores = head_scores(hidden, head, tied)
            token = int(torch.argmax(scores)) if settings is None else choose(scores, settings, seen, generator)
            out.append(token)
            if progress is not None:
                progress(step + 1, max_length)
            if token in stops:
                break
            if seen is not None:
                seen[token] = True
            ids = torch.tensor([[token]], device=device)
    return out
