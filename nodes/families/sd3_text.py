"""SD3's text encoding: three encoders, one token sequence (see nodes.families.sd3).

The CLIP half reuses :mod:`nodes.families.text` (77-token windows, ComfyUI's weight
rule, CLIPSetLastLayer), the T5 half FLUX's T5 rules (:mod:`nodes.families.t5_weights`).
An unweighted prompt of at most 75 tokens is encoded exactly as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` does (the parity tests hold this).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nodes.families.base import ConditioningError

if TYPE_CHECKING:
    import torch

    from nodes.families.sd3 import SD3


def present(clip: Any, family: "SD3") -> list[str]:
    """The encoder modules this CLIP has (a loader gives tokenizers only for the encoders it loaded)."""
    return [spec.module for spec in family.text_encoders if spec.tokenizer in clip.tokenizers]


def _clip_part(family: "SD3", clip: Any, prompts: dict[str, str], report: Any) -> dict[str, tuple]:
    """module -> (hidden states [1, n * 77, width], projected pooled [1, width]) for each CLIP given a prompt;
    the two get the same number of windows (empty-prompt windows appended, as ComfyUI does)."""
    from nodes.families import text as clip_text
    from nodes.prompt_syntax import parse

    specs = [s for s in family.text_encoders if s.kind != "t5" and s.module in prompts]
    tokens = {}
    for spec in specs:
        parsed = parse(prompts[spec.module])
        if report is not None:
            report.problems += [p for p in parsed.problems if p not in report.problems]
        tokens[spec.module] = clip_text.tokenize(clip.tokenizers[spec.tokenizer], parsed)
    windows = max((len(t.windows) for t in tokens.values()), default=1)
    out = {}
    for spec in specs:
        t = tokens[spec.module]
        t.windows += [list(t.empty)] * (windows - len(t.windows))
        t.weights += [[1.0] * len(t.empty)] * (windows - len(t.weights))
        if report is not None:
            report.tokens, report.windows = max(report.tokens, t.count), windows
            for name in t.skipped:  # as nodes.families.text.encode reports them
                note = f"embedding:{name} left out: Kiln does not load textual-inversion embeddings"
                if note not in report.problems:
                    report.problems.append(note)
        out[spec.module] = clip_text._encode_one(clip, spec, t, family.encoder_layer(spec, clip.layer))
    return out


def _t5_part(family: "SD3", clip: Any, prompt: str, report: Any) -> "torch.Tensor":
    """T5's last hidden state [1, 256, width] (diffusers' padding and truncation; weights by t5_weights)."""
    import torch

    from nodes.families import t5_weights
    from nodes.families.flux import t5_length
    from nodes.families.sd3 import T5_TOKENS
    from nodes.prompt_syntax import parse

    spec = family.text_encoders[2]
    tok = clip.tokenizers[spec.tokenizer]
    parsed = parse(prompt)
    if report is not None:
        report.problems += [p for p in parsed.problems if p not in report.problems]
    padding = clip.t5_padding
    with clip.encoder(spec.module) as t5:
        if parsed.weighted:
            length = T5_TOKENS if padding is None else t5_length(t5_weights.tokenize(tok, parsed, 1).count + 1, padding)
            tokens = t5_weights.tokenize(tok, parsed, length)
            states, count = t5_weights.encode(t5, tokens), tokens.count
        else:
            plain = "".join(seg.text for seg in parsed.segments)
            length = T5_TOKENS if padding is None else t5_length(len(tok(plain).input_ids), padding)
            ids = tok([plain], padding="max_length", max_length=length, truncation=padding is None,
                      add_special_tokens=True, return_tensors="pt").input_ids
            states = t5(ids.to(t5.device), output_hidden_states=False)[0]
            count = int((ids != tok.pad_token_id).sum()) - 1
    if report is not None:
        report.tokens = max(report.tokens, count)
    return states.to("cpu", torch.float32)


def encode(family: "SD3", clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
    """CONDITIONING [[embeds [1, clip tokens + 256, T5 width], {"pooled_output": [1, L + G width]}]]."""
    import torch
    import torch.nn.functional as F

    from nodes.families.sd3 import MISSING_WIDTHS

    texts = dict(texts or {})
    drop_empty = texts.pop("empty_padding", "empty_prompt") == "none"
    have = present(clip, family)
    if not have:
        raise ConditioningError(f"clip ({clip.name}) holds none of SD3's text encoders (CLIP-L, CLIP-G, T5-XXL): "
                                "load them with TripleCLIPLoader", "clip")
    prompts = {spec.module: texts.get(spec.tokenizer, text) for spec in family.text_encoders if spec.module in have}
    if drop_empty and all(prompts.get(m, "") == "" for m in ("text_encoder", "text_encoder_2")):
        prompts.pop("text_encoder", None)
        prompts.pop("text_encoder_2", None)
    if drop_empty and prompts.get("text_encoder_3") == "":
        prompts.pop("text_encoder_3")
    with torch.inference_mode():
        clips = _clip_part(family, clip, prompts, report)
        t5 = _t5_part(family, clip, prompts["text_encoder_3"], report) if "text_encoder_3" in prompts else None
    width = t5.shape[-1] if t5 is not None else MISSING_WIDTHS["text_encoder_3"]
    pooled, sequence = None, None
    if clips:
        tokens = next(iter(clips.values()))[0].shape[1]
        parts, pools = [], []
        for module in ("text_encoder", "text_encoder_2"):
            if module in clips:
                parts.append(clips[module][0])
                pools.append(clips[module][1])
            else:
                parts.append(torch.zeros(1, tokens, MISSING_WIDTHS[module]))
                pools.append(torch.zeros(1, MISSING_WIDTHS[module]))
        joined = torch.cat(parts, dim=-1)
        if joined.shape[-1] > width:
            raise ConditioningError(f"the CLIP states are {joined.shape[-1]} wide, wider than T5's {width}", "clip")
        sequence = F.pad(joined, (0, width - joined.shape[-1]))
        pooled = torch.cat(pools, dim=-1)
    if t5 is not None:
        sequence = t5 if sequence is None else torch.cat([sequence, t5], dim=1)
    if sequence is None:
        sequence = torch.zeros(1, 77, width)
    if pooled is None:
        pooled = torch.zeros(1, MISSING_WIDTHS["text_encoder"] + MISSING_WIDTHS["text_encoder_2"])
    return [[sequence, {"pooled_output": pooled}]]

