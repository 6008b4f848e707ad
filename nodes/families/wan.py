"""Wan 2.1 image-to-video as ChronoEdit-14B runs it: NVIDIA's image editor that generates a few frames
from the input picture and keeps the last one.

What it is made of, and where it lives:

* **Text.** UMT5-XXL (CLIPLoader type ``wan``: nodes.checkpoint.umt5_text; its tokenizer is the
  SentencePiece model the file carries). As ChronoEditPipeline encodes: the prompt's tokens and the end
  token (cut to :data:`TEXT_TOKENS`), UMT5's last hidden state, zeros after the prompt up to 512 tokens
  (ComfyUI's Wan encoder gives the same: a minimum length of 512, padding masked and zeroed). The
  transformer reads exactly 512 text tokens beside the picture's. ComfyUI's weight syntax is read as
  for FLUX's T5 (nodes.families.t5_weights).
* **Latents.** The Wan 2.1 VAE's (Qwen-Image's statistics: :data:`nodes.families.qwen_image.QWEN_LATENT`).
"""
from __future__ import annotations

from typing import Any

from nodes.families import qwen_image
from nodes.families.base import FlowFamily, Shapes, TextEncoderSpec

LABEL = "Wan 2.1 (ChronoEdit)"
#: Text tokens the transformer reads (ChronoEditPipeline's max_sequence_length; the network splits its
#: context at 512 from the end to find the picture's tokens).
TEXT_TOKENS = 512
#: ComfyUI's Wan 2.1 model sampling (supported_models.WAN21_T2V: shift 8); the template sets 5.
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 8.0,
             "use_dynamic_shifting": False, "prediction_type": "flow"}


class Wan21(FlowFamily):
    name = "wan21"
    latent = qwen_image.QWEN_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "umt5", ""),)
    clip_types = ("wan",)
    guidance_note = "Wan 2.1 has no distilled guidance (ChronoEdit runs real CFG with a negative prompt)"
    scheduler = SCHEDULER
    repeats_text = False  # zero padding after the prompt is part of the 512 tokens it reads
    #: A one-block UMT5 (no second bias to tell it from T5 by) is still UMT5 under type wan.
    text_kind_aliases = {"t5": "umt5"}

    def claims_unet(self, shapes: Shapes) -> bool:
        return False

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, 512, width]: UMT5's last hidden state of the prompt and its end token, zeros
        after (the module docstring)."""
        return [[encode_prompt(clip, (texts or {}).get("tokenizer", text), report), {}]]


def encode_prompt(clip: Any, text: str, report: Any = None) -> "Any":
    """[1, :data:`TEXT_TOKENS`, width] float32 on the CPU (see the module docstring)."""
    import torch

    from nodes.families import t5_weights
    from nodes.prompt_syntax import parse

    parsed = parse(text)
    if report is not None:
        report.problems += [p for p in parsed.problems if p not in report.problems]
    tok = clip.tokenizers["tokenizer"]
    with torch.inference_mode(), clip.encoder("text_encoder") as umt5:
        if parsed.weighted:
            tokens = t5_weights.tokenize(tok, parsed, TEXT_TOKENS)
            kept = min(tokens.count, TEXT_TOKENS - 1) + 1
            states = t5_weights.encode(umt5, tokens, masked=True)[:, :kept]
        else:
            ids = tok("".join(seg.text for seg in parsed.segments)).input_ids
            ids = ids[:TEXT_TOKENS - 1] + [tok.eos_token_id] if len(ids) > TEXT_TOKENS else ids
            device = next(umt5.parameters()).device
            states = umt5(torch.tensor([ids], device=device)).last_hidden_state.to("cpu", torch.float32)
            kept = len(ids)
    if report is not None:
        report.tokens = max(report.tokens, kept - 1)
        report.windows = 1
    out = torch.zeros(1, TEXT_TOKENS, states.shape[-1])
    out[:, :kept] = states.to("cpu", torch.float32)
    return out


FAMILY = Wan21()
