"""T5-XXL prompts with an attention mask, for the families whose diffusers pipelines mask them
(Chroma, PixArt-α and -Σ): one rule for the encoding and one for a call's mask rows.

diffusers' pipelines pad the prompt to a fixed length and mask the padding, in T5 and again in the
transformer; ComfyUI encodes the prompt unpadded with no mask, which Kiln gives under
``T5TokenizerOptions`` (``clip.t5_padding``). Weighted prompts (ComfyUI's syntax) follow FLUX's T5 rule
(:mod:`nodes.families.t5_weights`) with the same mask.
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import ConditioningError


def encode(clip: Any, text: str, report: Any, length: int, mask_key: str, padding_kept: int = 0) -> list:
    """CONDITIONING of ``text``: T5's last hidden state, padded to ``length`` tokens and masked (the
    mask under ``mask_key``, attending to the prompt, its end token and ``padding_kept`` padding tokens
    after it: Chroma's pipeline keeps one), or ComfyUI's unpadded encoding under T5TokenizerOptions."""
    import torch

    from nodes.families import flux, t5_weights
    from nodes.prompt_syntax import parse

    parsed = parse(text)
    if report is not None:
        report.problems += [p for p in parsed.problems if p not in report.problems]
    plain = "".join(seg.text for seg in parsed.segments)
    tok, padding = clip.tokenizers["tokenizer"], clip.t5_padding
    with torch.inference_mode(), clip.encoder("text_encoder") as t5:
        if parsed.weighted:
            count = t5_weights.tokenize(tok, parsed, 1).count
            length = length if padding is None else flux.t5_length(count + 1, padding)
            tokens = t5_weights.tokenize(tok, parsed, length)
            states = t5_weights.encode(t5, tokens, masked=padding is None)
            count = min(tokens.count, length - 1)
            kept = count + 1  # the prompt and its end token
        else:
            length = length if padding is None else flux.t5_length(len(tok(plain).input_ids), padding)
            got = tok([plain], padding="max_length", max_length=length, truncation=padding is None,
                      return_tensors="pt")
            mask = got.attention_mask if padding is None else None
            states = t5(got.input_ids.to(t5.device), attention_mask=None if mask is None else mask.to(t5.device),
                        output_hidden_states=False)[0]
            kept = int(got.attention_mask.sum())
            count = kept - 1
    if report is not None:
        report.tokens = max(report.tokens, count)
        report.windows = 1
    extra: dict[str, Any] = {}
    if padding is None:
        extra[mask_key] = (torch.arange(length) < kept + padding_kept).to(torch.float32).reshape(1, -1)
    return [[states.to("cpu", torch.float32), extra]]


def mask_rows(extras: list[dict], mask_key: str, batch: int, label: str, device: Any, dtype: Any) -> dict[str, Any]:
    """The network's ``text_mask`` for a call: each conditioning's own mask, ones where one has none but
    another has (an unmasked prompt attends to all its tokens), no mask at all when none has one
    (ComfyUI's encoding)."""
    import torch

    masks = [extra.get(mask_key) for extra in extras]
    if all(m is None for m in masks):
        return {}
    tokens = next(m for m in masks if m is not None).shape[-1]
    rows = []
    for m in masks:
        m = torch.ones(1, tokens) if m is None else m.reshape(1, -1)
        if m.shape[-1] != tokens:
            raise ConditioningError(f"{label} prompts with {m.shape[-1]} and {tokens} T5 tokens cannot share a "
                                    "network call (encode both the same way)", "negative")
        rows.append(m.expand(batch, -1))
    return {"text_mask": torch.cat(rows).to(device=device, dtype=dtype)}


def fit_mask(mask: Any, tokens: int, label: str) -> Any:
    """The text mask for a context of ``tokens``: as it is, or repeated where the prompt was (the
    denoiser repeats a shorter prompt to share a call, ComfyUI's rule; ConditioningConcat appends
    tokens the mask of its first input then covers by the same repetition)."""
    length = mask.shape[1]
    if length == tokens:
        return mask
    if tokens % length:
        raise ConditioningError(f"the prompt has {tokens} T5 tokens but its {label} text mask covers {length} (was "
                                "it combined with a prompt encoded another way? encode both with the same CLIP)",
                                "positive")
    return mask.repeat(1, tokens // length)


def joint_mask(text_mask: Any, text_tokens: int, image_tokens: int, label: str, device: Any, dtype: Any) -> Any:
    """A joint-attention transformer's mask from a prompt's text mask (Chroma's and Chroma1-Radiance's rule):
    the text mask fitted to the context (:func:`fit_mask`) then ones over the image tokens; None for no mask."""
    if text_mask is None:
        return None
    import torch

    text_mask = fit_mask(text_mask, text_tokens, label)
    image = torch.ones(text_mask.shape[0], image_tokens, device=device, dtype=dtype)
    return torch.cat([text_mask.to(device, dtype), image], dim=1)
